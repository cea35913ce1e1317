// The npm `ollama` and `openai` packages against a real kiln serve, driven as their
// READMEs drive them. Run by tests/real/test_js_clients.py:
//   node clients.mjs CASE BASE_URL
// Each case prints one JSON object (what the client returned, as the client typed it)
// on stdout; the Python test judges it. A client exception is printed as
// {"threw": {...}} so that a refusal can be judged too.

import { Ollama } from "ollama";
import OpenAI from "openai";

const [, , name, base] = process.argv;
const MODEL = "smollm2:135m";
const COUNT = [{ role: "user", content: "Count from one to ten." }];
const ollama = new Ollama({ host: base });
const openai = new OpenAI({ baseURL: `${base}/v1`, apiKey: "unused", maxRetries: 0, timeout: 300_000 });

const cases = {
  async "ollama-list"() {
    const tags = await ollama.list();
    const ps = await ollama.ps();
    const version = await ollama.version();
    return { names: tags.models.map((m) => m.name), details: tags.models[0].details, ps, version };
  },

  async "ollama-show"() {
    const r = await ollama.show({ model: MODEL });
    return { capabilities: r.capabilities, details: r.details, template: typeof r.template };
  },

  async "ollama-chat"() {
    return await ollama.chat({ model: MODEL, messages: COUNT, options: { temperature: 0, num_predict: 8 } });
  },

  async "ollama-chat-stream"() {
    const parts = [];
    for await (const part of await ollama.chat({ model: MODEL, messages: COUNT, stream: true,
                                                 options: { temperature: 0, num_predict: 10 } })) {
      parts.push(part);
    }
    return { parts };
  },

  async "ollama-generate"() {
    const whole = await ollama.generate({ model: MODEL, prompt: "Name a color.", options: { temperature: 0, num_predict: 6 } });
    const parts = [];
    for await (const part of await ollama.generate({ model: MODEL, prompt: "Name a color.", stream: true,
                                                     options: { temperature: 0, num_predict: 6 } })) {
      parts.push(part);
    }
    return { whole, parts };
  },

  async "ollama-embed"() {
    const r = await ollama.embed({ model: MODEL, input: ["a cat", "a dog"] });
    const legacy = await ollama.embeddings({ model: MODEL, prompt: "a cat" });
    return { count: r.embeddings.length, dims: r.embeddings.map((e) => e.length), legacy_dim: legacy.embedding.length,
             prompt_eval_count: r.prompt_eval_count };
  },

  async "ollama-error"() {
    await ollama.chat({ model: "no-such-model:1b", messages: COUNT });
    return { threw: null };
  },

  async "openai-models"() {
    const page = await openai.models.list();
    const one = await openai.models.retrieve(MODEL);
    return { ids: page.data.map((m) => m.id), one };
  },

  async "openai-chat"() {
    return await openai.chat.completions.create({ model: MODEL, messages: COUNT, max_tokens: 8, temperature: 0 });
  },

  async "openai-chat-stream"() {
    const stream = await openai.chat.completions.create({ model: MODEL, messages: COUNT, max_tokens: 10, temperature: 0,
                                                          stream: true, stream_options: { include_usage: true } });
    const chunks = [];
    for await (const chunk of stream) chunks.push(chunk);
    return { chunks };
  },

  async "openai-completion"() {
    return await openai.completions.create({ model: MODEL, prompt: "Name a color.", max_tokens: 6, temperature: 0 });
  },

  async "openai-embeddings"() {
    const r = await openai.embeddings.create({ model: MODEL, input: ["a cat", "a dog"] });
    return { count: r.data.length, dims: r.data.map((d) => d.embedding.length), usage: r.usage, object: r.object };
  },

  async "openai-error"() {
    await openai.chat.completions.create({ model: MODEL, messages: COUNT, max_tokens: -1 });
    return { threw: null };
  },

  async "openai-missing-model"() {
    await openai.chat.completions.create({ model: "no-such-model:1b", messages: COUNT, max_tokens: 4 });
    return { threw: null };
  },
};

const run = cases[name];
if (!run) {
  console.error(`unknown case ${name}; cases: ${Object.keys(cases).join(", ")}`);
  process.exit(2);
}
try {
  console.log(JSON.stringify(await run()));
} catch (e) {
  // ollama's ResponseError: {error, status_code}; openai's APIError: {status, code, param, type, error}
  console.log(JSON.stringify({ threw: { class: e.constructor.name, message: e.message, status_code: e.status_code,
                                        status: e.status, code: e.code, param: e.param, type: e.type, error: e.error } }));
}
