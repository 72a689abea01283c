#!/usr/bin/env node
'use strict';
// Runs one training step's calls against a live server and prints the replies
// as JSON.
//
//   node run.js --target 127.0.0.1:50051 [--input step.json]
//
// step.json: {run_id, config, reward_request, weight_request, update}; without
// --input a small built-in batch is used.

const fs = require('node:fs');
const { MaxEntClient, trainingStep } = require('./maxent');

const EXAMPLE = {
  run_id: 'node-example',
  config: { tau: 0.5, beta: 0.04, target_entropy: 0.6, tau_lr: 0.05 },
  reward_request: {
    group_sizes: [3, 2],
    completions: [
      '<think>2+2 is 4</think> <answer>\\boxed{4}</answer>',
      '\\boxed{5}',
      'no idea',
      '\\boxed{3}',
      '<think>1+2</think><answer>\\boxed{3}</answer>',
    ],
    answers: ['4', '3'],
    rewards: [{ name: 'boxed_accuracy', weight: 1.0 }, { name: 'format', weight: 0.5 }],
  },
  weight_request: { ref_logp_sum: [-12.0, -30.5, -8.1, -4.0, -9.9], ref_token_counts: [10, 25, 7, 3, 9] },
  update: { global_step: 1, measured_kl: 0.03 },
};

function parseArgs(argv) {
  const args = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || argv[i + 1] === undefined) {
      throw new Error(`bad argument ${argv[i]}: expected --name value pairs`);
    }
    args[argv[i].slice(2)] = argv[i + 1];
  }
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const input = args.input ? JSON.parse(fs.readFileSync(args.input, 'utf8')) : EXAMPLE;
  const client = new MaxEntClient(args.target || '127.0.0.1:50051', { timeoutMs: Number(args['timeout-ms'] || 60000) });
  try {
    const result = await trainingStep(client, input);
    process.stdout.write(JSON.stringify(result, null, 2) + '\n');
  } finally {
    client.close();
  }
}

if (require.main === module) {
  main().catch((error) => {
    console.error(error.message);
    process.exit(1);
  });
}

module.exports = { EXAMPLE, parseArgs };
