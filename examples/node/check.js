#!/usr/bin/env node
'use strict';
// Checks the Node client against the Python client's numbers.
//
//   node check.js --target HOST:PORT --input step.json --expected expected.json [--tolerance 1e-9]
//
// Runs the step in step.json (see run.js) through the Node client and compares
// every number with expected.json, which the Python client wrote for the same
// batch on a fresh run with the same config:
//   {run: {tau, beta, version}, reward: {total_utils, advantages, q_values, reward_mean, reward_std,
//    per_reward: {name: values}}, weights: {...WeightStats}, update: {...ControllerState}}
// Prints one line per check and a closing "N passed, N failed" line; exits 1 on
// any failure.

const fs = require('node:fs');
const { MaxEntClient, trainingStep } = require('./maxent');
const { parseArgs } = require('./run');

function close(a, b, tol) {
  return Math.abs(a - b) <= tol * Math.max(1, Math.abs(a), Math.abs(b));
}

class Checker {
  constructor(tolerance) {
    this.tolerance = tolerance;
    this.passed = 0;
    this.failed = 0;
  }

  report(name, ok, detail) {
    if (ok) {
      this.passed += 1;
      console.log(`ok   ${name}`);
    } else {
      this.failed += 1;
      console.log(`FAIL ${name}: ${detail}`);
    }
  }

  // With defaults off, a field the server left at its zero value is absent.
  number(name, got, want) {
    if (want === null || want === undefined) {
      this.report(name, got === undefined || got === null, `expected unset, got ${got}`);
      return;
    }
    const value = got === undefined || got === null ? 0 : Number(got);
    this.report(name, close(value, want, this.tolerance), `got ${value}, expected ${want}`);
  }

  array(name, got, want) {
    const values = (got || []).map(Number);
    if (values.length !== want.length) {
      this.report(name, false, `got ${values.length} values, expected ${want.length}`);
      return;
    }
    const bad = values.findIndex((v, i) => !close(v, want[i], this.tolerance));
    this.report(name, bad < 0, bad < 0 ? '' : `[${bad}] got ${values[bad]}, expected ${want[bad]}`);
  }
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  for (const name of ['target', 'input', 'expected']) {
    if (!args[name]) throw new Error(`--${name} is required`);
  }
  const input = JSON.parse(fs.readFileSync(args.input, 'utf8'));
  const expected = JSON.parse(fs.readFileSync(args.expected, 'utf8'));
  const check = new Checker(Number(args.tolerance || 1e-9));

  const client = new MaxEntClient(args.target, { timeoutMs: Number(args['timeout-ms'] || 60000) });
  let result;
  try {
    result = await trainingStep(client, input);
  } finally {
    client.close();
  }
  const { run, rewardStatistics: reward, weightStats: weights, update } = result;

  check.report('CreateRun.run_id', run.run_id === input.run_id, `got ${run.run_id}`);
  for (const key of Object.keys(expected.run)) check.number(`CreateRun.state.${key}`, run.state[key], expected.run[key]);

  for (const key of ['total_utils', 'advantages', 'q_values']) {
    check.array(`ComputeRewardStatistics.${key}`, reward[key], expected.reward[key]);
  }
  for (const key of ['reward_mean', 'reward_std']) {
    check.number(`ComputeRewardStatistics.${key}`, reward[key], expected.reward[key]);
  }
  const perReward = Object.fromEntries((reward.per_reward || []).map((r) => [r.name, r.values]));
  for (const [name, values] of Object.entries(expected.reward.per_reward)) {
    check.array(`ComputeRewardStatistics.per_reward[${name}]`, perReward[name], values);
  }

  for (const key of ['weights', 'advantage_entropy', 'group_weight_entropies']) {
    check.array(`ComputeWeightStats.${key}`, weights[key], expected.weights[key]);
  }
  for (const key of ['weight_entropy', 'weight_entropy_min', 'weight_entropy_max', 'tau', 'beta',
    'controller_version']) {
    check.number(`ComputeWeightStats.${key}`, weights[key], expected.weights[key]);
  }

  check.report('UpdateController.replayed', !update.replayed, 'a fresh request id was a replay');
  for (const [key, want] of Object.entries(expected.update)) {
    check.number(`UpdateController.state.${key}`, update.state[key], want);
  }

  console.log(`node-check: ${check.passed} passed, ${check.failed} failed`);
  process.exit(check.failed ? 1 : 0);
}

main().catch((error) => {
  console.error(error.stack || error.message);
  process.exit(2);
});
