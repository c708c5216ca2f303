#!/usr/bin/env node
// Runs an isp export's model.onnx in onnxruntime (the npm package onnxruntime-node, which ships its CPU runtime)
// on the sample input of sample.json and compares with the logits isp computed in C++; then the first image
// alone, which checks the symbolic batch dimension. Several folders are checked in one start, each line naming
// its folder and each folder ending with {"export_dir": ..., "ok": ...}; an error in one fails that one only.
//
//   NODE_PATH=.node/node_modules node scripts/check_export_onnxruntime.js [--tolerance T] EXPORT_DIR...
//
// T (default 1e-4) is per unit of the largest |logit| where that exceeds 1. Exit status: 0 when every folder is
// within it, 1 otherwise, 2 for bad arguments, 77 when onnxruntime-node is not installed (scripts/setup.sh installs
// it into .node/ with `npm install --ignore-scripts`: its install script only fetches optional GPU binaries).
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

// Checks one export folder: one line per batch size, true when all agree.
async function check(dir, tolerance) {
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
    console.log(JSON.stringify({export_dir: dir, format: 'onnx', how: 'model.onnx in onnxruntime-node',
                                runtime: `onnxruntime ${ort.env.versions.common} (Node.js ${process.versions.node})`,
                                images, max_abs_logit_delta: delta, tolerance: tolerance * scale,
                                same_predicted_class: sameClass}));
  }
  return ok;
}

async function main() {
  const args = process.argv.slice(2);
  let tolerance = 1e-4;
  const dirs = [];
  for (let i = 0; i < args.length; ++i) {
    if (args[i] === '--tolerance') tolerance = Number(args[++i]);
    else dirs.push(args[i]);
  }
  if (dirs.length === 0 || !(tolerance > 0)) {
    console.error('usage: check_export_onnxruntime.js [--tolerance T > 0] EXPORT_DIR...');
    process.exit(2);
  }
  let allOk = true;
  for (const dir of dirs) {
    let verdict;
    try {
      verdict = {export_dir: dir, ok: await check(dir, tolerance)};
    } catch (e) {  // a missing file, a model onnxruntime refuses: this folder fails, not the rest
      verdict = {export_dir: dir, ok: false, error: String(e.message || e)};
    }
    console.log(JSON.stringify(verdict));
    allOk = allOk && verdict.ok;
  }
  process.exit(allOk ? 0 : 1);
}

main().catch((e) => {
  console.error(`error: ${e.message || e}`);
  process.exit(1);
});
