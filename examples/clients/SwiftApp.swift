// An app's whole use of a Perch package with swift-transformers (not built here: needs macOS 15 / iOS 18).
//   perch export tiiuae/falcon-7b --to coreml --for swift-transformers --quantize int4 --out falcon-swift
//   xcrun coremlc compile falcon-swift/model.mlpackage falcon-swift/   # -> falcon-swift/model.mlmodelc
// Ship the folder (model.mlmodelc, tokenizer.json, tokenizer_config.json, config.json) with the app.
import Foundation
import Generation
import Models
import Tokenizers

func run(folder: URL) async throws -> String {
    // The package names the checkpoint (co.huggingface.exporters.name); for a model that is not on the hub,
    // load the tokenizer from the export folder and hand it over, so nothing is fetched.
    let tokenizer = try await AutoTokenizer.from(modelFolder: folder)
    let model = try LanguageModel.loadCompiled(url: folder.appendingPathComponent("model.mlmodelc"),
                                               computeUnits: .cpuAndGPU, tokenizer: tokenizer)
    var config = model.defaultGenerationConfig
    config.doSample = false
    config.maxNewTokens = 24
    return try await model.generate(config: config, prompt: "The list type")
}
