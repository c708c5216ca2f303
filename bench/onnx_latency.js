#!/usr/bin/env node
// onnxruntime latency of ONNX files at batch 1 and 64, median of RUNS runs after 10 warm-up runs, one intra-op
// thread unless THREADS says otherwise (bench/export_latency.sh). Prints a JSON array of rows.
//   CHW=3,32,32 NODE_PATH=.node/node_modules node bench/onnx_latency.js NETWORK:EXPORTER=FILE.onnx ...
'use strict';
const ort = require('onnxruntime-node');

async function main() {
  const runs = Number(process.env.RUNS || 100), threads = Number(process.env.THREADS || 1);
  const rows = [];
  for (const arg of process.argv.slice(2)) {
    const [name, file] = arg.split('=');
    const session = await ort.InferenceSession.create(file, {intraOpNumThreads: threads, interOpNumThreads: 1});
    const [c, h, w] = (process.env.CHW || '3,32,32').split(',').map(Number);
    for (const batch of [1, 64]) {
      const x = new ort.Tensor('float32', Float32Array.from({length: batch * c * h * w}, () => Math.random() - 0.5), [batch, c, h, w]);
      const feeds = {[session.inputNames[0]]: x};
      for (let i = 0; i < 10; ++i) await session.run(feeds);
      const times = [];
      for (let i = 0; i < runs; ++i) {
        const t0 = process.hrtime.bigint();
        await session.run(feeds);
        times.push(Number(process.hrtime.bigint() - t0) / 1e6);
      }
      times.sort((a, b) => a - b);
      const mid = times.length >> 1;
      const median = times.length % 2 ? times[mid] : 0.5 * (times[mid - 1] + times[mid]);
      rows.push({network: name.split(':')[0], runtime: `onnxruntime ${ort.env.versions.common} (${name.split(':')[1] || 'model'})`, batch, ms: median});
    }
  }
  console.log(JSON.stringify(rows));
}
main().catch((e) => { console.error(`error: ${e.message || e}`); process.exit(1); });
