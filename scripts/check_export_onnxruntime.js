#!/usr/bin/env node
// Runs an isp export's model.onnx in onnxruntime (the npm package onnxruntime-node, which ships its CPU runtime)
// on the sample input of sample.json and compares with the logits isp computed in C++; then the first image
// alone, which checks the symbolic batch dimension.
//
//   NODE_PATH=.node/node_modules node scripts/check_export_onnxruntime.js work_dirs/quick_fmnist/export [TOLERANCE]
//
// TOLERANCE (default 1e-4) is per unit of the largest |logit| where that exceeds 1. Exit status: 0 within it,
// 1 beyond it or on any error, 77 when onnxruntime-node is not installed (scripts/setup.sh installs it into
// .node/ with `npm install --ignore-scripts`: its install script only fetches optional GPU binaries).
'use strict';
const fs = require('fs');
const path = require('path');

let ort;
try {
  ort = require('onnxruntime-node');
} catch (e) {
  console.log('skipped: onnxruntime-node is not installed (scripts/setup.sh installs it into .node/)');
  process.exit(77);
}

async function main() {
  const dir = process.argv[2];
  const tolerance = Number(process.argv[3] || 1e-4);
  const sample = JSON.parse(fs.readFileSync(path.join(dir, 'sample.json'), 'utf8'));
  const session = await ort.InferenceSession.create(path.join(dir, 'model.onnx'));
  const [n, classes] = sample.logits.shape;
  const expected = sample.logits.values;
  const scale = Math.max(1, ...expected.map(Math.abs));
  const perImage = sample.input.values.length / n;
  async function run(images) {
    const shape = [images, ...sample.input.shape.slice(1)];
    const input = new ort.Tensor('float32', Float32Array.from(sample.input.values.slice(0, images * perImage)), shape);
    const out = await session.run({input});
    return out.logits.data;
  }
  let ok = true;
  for (const images of [n, 1]) {
    const got = await run(images);
    let delta = 0, sameClass = true;
    for (let i = 0; i < images; ++i) {
      let bestGot = 0, bestExp = 0;
      for (let c = 0; c < classes; ++c) {
        const k = i * classes + c;
        delta = Math.max(delta, Math.abs(got[k] - expected[k]));
        if (got[k] > got[i * classes + bestGot]) bestGot = c;
        if (expected[k] > expected[i * classes + bestExp]) bestExp = c;
      }
      sameClass = sameClass && bestGot === bestExp;
    }
    ok = ok && delta <= tolerance * scale && sameClass;
    console.log(JSON.stringify({format: 'onnx', how: 'model.onnx in onnxruntime-node', runtime: `onnxruntime ${ort.env.versions.common} (Node.js ${process.versions.node})`,
                                images, max_abs_logit_delta: delta, tolerance: tolerance * scale, same_predicted_class: sameClass}));
  }
  process.exit(ok ? 0 : 1);
}

main().catch((e) => {
  console.error(`error: ${e.message || e}`);
  process.exit(1);
});
