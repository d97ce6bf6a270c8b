// Greedy generation with transformers.js (@huggingface/transformers) on onnxruntime-node, as an app would:
// AutoModelForCausalLM.from_pretrained(dir) from local files, then generate(). Prints one JSON line:
// {"tokens": [...new token ids...], "first_logits": [...]} (first_logits: the prompt's last-position scores).
// usage: PERCH_NODE_MODULES=DIR node tjs_generate.mjs MODEL_DIR '[prompt ids]' MAX_NEW_TOKENS
// (PERCH_NODE_MODULES: the folder holding node_modules/@huggingface/transformers; see tests/clients/install.sh)
import path from "node:path";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";

const require = createRequire(path.join(path.resolve(process.env.PERCH_NODE_MODULES ?? "."), "package.json"));
const entry = require.resolve("@huggingface/transformers").replace(/\.cjs$/, ".mjs");
const { AutoModelForCausalLM, Tensor, env } = await import(pathToFileURL(entry).href);

const [dir, idsJson, maxNew] = process.argv.slice(2);
env.allowRemoteModels = false;  // local files only: what a user with an exported folder does
env.localModelPath = path.dirname(path.resolve(dir));
const ids = JSON.parse(idsJson).map(BigInt);
const model = await AutoModelForCausalLM.from_pretrained(path.basename(path.resolve(dir)), { local_files_only: true });
const input_ids = new Tensor("int64", BigInt64Array.from(ids), [1, ids.length]);
const attention_mask = new Tensor("int64", BigInt64Array.from(ids.map(() => 1n)), [1, ids.length]);
const first = await model({ input_ids, attention_mask });
const scores = first.logits.slice(null, -1, null).data;
const n = Number(maxNew);
const out = await model.generate({ input_ids, attention_mask, max_new_tokens: n, min_new_tokens: n, do_sample: false });
const tokens = Array.from(out.data).slice(ids.length).map(Number);
console.log(JSON.stringify({ tokens, first_logits: Array.from(scores) }));
