// Greedy text from a Perch Falcon export with transformers.js in Node (npm install @huggingface/transformers;
// set ONNXRUNTIME_NODE_INSTALL=skip or pass --ignore-scripts: the CPU binaries ship in the package).
//
//   perch export tiiuae/falcon-7b --to onnx --for transformers.js --out models/falcon-tjs
//   node examples/clients/transformers_js_generate.mjs models/falcon-tjs "The list type" 24
import path from "node:path";
import { AutoModelForCausalLM, AutoTokenizer, env } from "@huggingface/transformers";

const [dir, prompt, maxNew = "24"] = process.argv.slice(2);
env.allowRemoteModels = false;                  // local files only
env.localModelPath = path.dirname(path.resolve(dir));
const name = path.basename(path.resolve(dir));  // reads config.json, tokenizer.json and onnx/model.onnx
const tokenizer = await AutoTokenizer.from_pretrained(name);
const model = await AutoModelForCausalLM.from_pretrained(name);
const inputs = tokenizer(prompt, { add_special_tokens: false });
const out = await model.generate({ ...inputs, max_new_tokens: Number(maxNew), do_sample: false });
const ids = Array.from(out.data).map(Number).slice(inputs.input_ids.dims[1]);
console.log("tokens:", JSON.stringify(ids));
console.log(prompt + tokenizer.decode(ids, { skip_special_tokens: true }));
