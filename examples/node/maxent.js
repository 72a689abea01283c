'use strict';
// A small Node.js client of the MaxEnt-GRPO service.
//
// The service definition is read from proto/maxent/v1/maxent.proto at run time
// with @grpc/proto-loader: no generated code. Messages are plain objects with
// the proto's snake_case field names; int64 fields are JavaScript numbers.

const crypto = require('node:crypto');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const PROTO_FILE = 'maxent/v1/maxent.proto';

function loadService(protoRoot = PROTO_ROOT) {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [protoRoot],
    keepCase: true, // field names exactly as in the proto
    longs: Number, // int64 as numbers (group sizes, versions, steps)
    enums: String, // enum values by name
    defaults: false, // unset fields stay absent: proto3 `optional` fields keep their presence
    oneofs: false,
  });
  return grpc.loadPackageDefinition(definition).maxent.v1.MaxEntService;
}

class MaxEntClient {
  // target: "host:port". timeoutMs: the deadline of every call.
  constructor(target, { timeoutMs = 30000, credentials = grpc.credentials.createInsecure() } = {}) {
    const Service = loadService();
    this.target = target;
    this.timeoutMs = timeoutMs;
    this.stub = new Service(target, credentials, {
      'grpc.max_receive_message_length': 64 * 1024 * 1024,
      'grpc.max_send_message_length': 64 * 1024 * 1024,
    });
  }

  close() {
    this.stub.close();
  }

  call(method, request) {
    return new Promise((resolve, reject) => {
      const deadline = new Date(Date.now() + this.timeoutMs);
      this.stub[method](request, { deadline }, (error, response) => {
        if (error) {
          const code = Object.keys(grpc.status).find((name) => grpc.status[name] === error.code) || error.code;
          const wrapped = new Error(`${method} failed: ${code}: ${error.details || error.message}`);
          wrapped.code = error.code;
          reject(wrapped);
        } else {
          resolve(response);
        }
      });
    });
  }

  // config: a WeightingConfig object, e.g. {tau: 0.5, beta: 0.04, target_entropy: 1.2, tau_lr: 0.05}.
  async createRun(runId, config = {}) {
    return (await this.call('CreateRun', { run_id: runId, config })).run;
  }

  async getRun(runId) {
    return (await this.call('GetRun', { run_id: runId })).run;
  }

  // request: a ComputeRewardStatisticsRequest, flat per-completion arrays with
  // group_sizes, e.g. {group_sizes: [2], completions: [...], answers: ['4'],
  // rewards: [{name: 'math_accuracy', weight: 1}], run_id: 'exp-1'}.
  computeRewardStatistics(request) {
    return this.call('ComputeRewardStatistics', request);
  }

  // request: a ComputeWeightStatsRequest without run_id.
  computeWeightStats(runId, request) {
    return this.call('ComputeWeightStats', { ...request, run_id: runId });
  }

  // One controller step. A request_id is made when none is given; send the
  // same id again to retry safely (the server applies it once).
  updateController(runId, { request_id = crypto.randomUUID(), ...fields } = {}) {
    return this.call('UpdateController', { ...fields, run_id: runId, request_id });
  }
}

// The four calls of one training step: create (or reuse) the run, score the
// batch, weight it, and step the controller with the measured weight entropy.
// input: {run_id, config, reward_request, weight_request, update}.
async function trainingStep(client, input) {
  const run = await client.createRun(input.run_id, input.config || {});
  const rewardStatistics = await client.computeRewardStatistics({ ...input.reward_request, run_id: input.run_id });
  const weightStats = await client.computeWeightStats(input.run_id, {
    ...input.weight_request,
    group_sizes: input.reward_request.group_sizes,
    q_values: rewardStatistics.q_values,
  });
  const update = await client.updateController(input.run_id, {
    ...input.update,
    weight_entropy: weightStats.weight_entropy,
  });
  return { run, rewardStatistics, weightStats, update };
}

module.exports = { MaxEntClient, loadService, trainingStep, PROTO_ROOT };
