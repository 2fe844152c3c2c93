// Runs GGUF files in llama.cpp through node-llama-cpp's prebuilt CPU binaries.
//
// Usage: node llamacpp_runner.mjs NODE_MODULES_DIR < request.json > answer.json
// A request: {"runs": [{"model": PATH, "lora": [{"path": PATH, "scale": 1}], "context": 256,
//             "tasks": [{"kind": "tokenize", "text": "..."},
//                       {"kind": "greedy", "tokens": [ids], "count": N},
//                       {"kind": "nll", "tokens": [ids]},
//                       {"kind": "perplexity", "text": "...", "window": N}]}, ...]}
// The answer: {"runs": [[one answer per task, in order], ...]}: tokenize -> {"tokens": [ids]};
// greedy -> {"tokens": [N ids]}; nll -> {"nll": sum of -log p(token | prefix) over
// tokens[1:], "count": n}; perplexity -> the same summed over the text's tokens cut into
// windows of N (each window's first token unpredicted), plus "tokens". One process runs every file, so llama.cpp loads once.
// Nothing is downloaded or built: the binaries must already be installed
// (npm ci --prefix tests/llamacpp).
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
const { getLlama, LlamaLogLevel } = await import(
  pathToFileURL(join(modules, "node-llama-cpp", "dist", "index.js")).href
);
const request = JSON.parse(readFileSync(0, "utf8"));
const llama = await getLlama({
  gpu: false,
  build: "never",
  usePrebuiltBinaries: true,
  logLevel: LlamaLogLevel.error,
});
const probability = { temperature: 1, topK: 0, topP: 1, minP: 0 };

async function greedy(model, options, tokens, count) {
  const context = await model.createContext(options);
  const sequence = context.getSequence();
  const out = [];
  let input = tokens.map((t, i) =>
    i === tokens.length - 1 ? [t, { generateNext: { token: true, options: { temperature: 0 } } }] : t,
  );
  for (let n = 0; n < count; n++) {
    const result = await sequence.controlledEvaluate(input);
    const next = result[input.length - 1].next.token;
    out.push(next);
    input = [[next, { generateNext: { token: true, options: { temperature: 0 } } }]];
  }
  await context.dispose();
  return { tokens: out };
}

async function nll(model, options, tokens) {
  const context = await model.createContext(options);
  const sequence = context.getSequence();
  const input = tokens.map((t, i) =>
    i < tokens.length - 1 ? [t, { generateNext: { probabilities: true, options: probability } }] : t,
  );
  const result = await sequence.controlledEvaluate(input);
  let total = 0;
  for (let i = 0; i < tokens.length - 1; i++) {
    const p = result[i].next.probabilities.get(tokens[i + 1]) ?? 0;
    total -= Math.log(Math.max(p, 1e-30));
  }
  await context.dispose();
  return { nll: total, count: tokens.length - 1 };
}

const runs = [];
for (const run of request.runs) {
  const model = await llama.loadModel({ modelPath: run.model, gpuLayers: 0 });
  const options = {
    contextSize: run.context ?? 256,
    batchSize: run.context ?? 256,
    threads: request.threads ?? 1,
  };
  if (run.lora && run.lora.length) {
    options.lora = { adapters: run.lora.map((a) => ({ filePath: a.path, scale: a.scale ?? 1 })) };
  }
  const answers = [];
  for (const task of run.tasks) {
    if (task.kind === "tokenize") {
      answers.push({ tokens: Array.from(model.tokenize(task.text)) });
    } else if (task.kind === "greedy") {
      answers.push(await greedy(model, options, task.tokens, task.count));
    } else if (task.kind === "nll") {
      answers.push(await nll(model, options, task.tokens));
    } else if (task.kind === "perplexity") {
      const tokens = Array.from(model.tokenize(task.text));
      let total = 0;
      let count = 0;
      for (let start = 0; start + 1 < tokens.length; start += task.window) {
        const part = await nll(model, options, tokens.slice(start, start + task.window));
        total += part.nll;
        count += part.count;
      }
      answers.push({ nll: total, count, tokens: tokens.length });
    } else {
      throw new Error(`unknown task ${task.kind}`);
    }
  }
  runs.push(answers);
  await model.dispose();
}
process.stdout.write(JSON.stringify({ runs }));
await llama.dispose();
