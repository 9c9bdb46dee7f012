// A Node.js client for llm-gateway, loading the contract from proto/ at run time.
//
// No generated code: @grpc/proto-loader reads proto/llmgateway/v1/*.proto
// (generation, token, usage and keys; the well-known types they import,
// struct, duration, timestamp and field_mask, are bundled with protobufjs)
// and @grpc/grpc-js builds the stubs. Messages are plain objects with the proto's field names
// (keepCase), enums as their names and int64 as strings, as in the
// contract's JSON form. Copy this folder beside a checkout of proto/, or
// point LLMGW_PROTO_ROOT at one.
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = process.env.LLMGW_PROTO_ROOT || path.resolve(__dirname, '..', '..', 'proto');

// As the Python client (clients/_channel.py): grpc retries UNAVAILABLE
// before any response arrived; the gateway retries its upstreams itself.
const SERVICE_CONFIG = {
  methodConfig: [
    {
      name: [{ service: 'llmgateway.v1.GenerationService' }],
      retryPolicy: {
        maxAttempts: 4,
        initialBackoff: '0.2s',
        maxBackoff: '3s',
        backoffMultiplier: 2,
        retryableStatusCodes: ['UNAVAILABLE'],
      },
    },
  ],
};

// Every file of the contract: GenerationService, TokenService, and the admin
// services UsageService and KeyService (callable with an `admin` key).
const CONTRACT_FILES = ['generation', 'token', 'usage', 'keys'].map(
  (name) => `llmgateway/v1/${name}.proto`,
);

/** The llmgateway.v1 package: service constructors and message types. */
function loadContract(protoRoot = PROTO_ROOT) {
  const definition = protoLoader.loadSync(
    CONTRACT_FILES,
    { includeDirs: [protoRoot], keepCase: true, longs: String, enums: String, oneofs: true },
  );
  return grpc.loadPackageDefinition(definition).llmgateway.v1;
}

class GatewayClient {
  /**
   * @param {string} address host:port of the gateway
   * @param {{apiKey?: string, tls?: boolean, timeoutMs?: number}} options
   *   apiKey is sent as `authorization: Bearer <key>` on every call.
   */
  constructor(address, { apiKey, tls = false, timeoutMs = 600_000 } = {}) {
    const contract = loadContract();
    const credentials = tls ? grpc.credentials.createSsl() : grpc.credentials.createInsecure();
    this.stub = new contract.GenerationService(address, credentials, {
      'grpc.service_config': JSON.stringify(SERVICE_CONFIG),
      'grpc.keepalive_time_ms': 30_000,
      'grpc.keepalive_timeout_ms': 10_000,
    });
    // The other services share the generation stub's channel (one connection).
    const shared = { channelOverride: this.stub.getChannel() };
    this.services = { GenerationService: this.stub };
    for (const name of ['TokenService', 'UsageService', 'KeyService']) {
      this.services[name] = new contract[name](address, credentials, shared);
    }
    this.apiKey = apiKey;
    this.timeoutMs = timeoutMs;
  }

  /**
   * Any unary method of the contract, e.g. call('KeyService', 'ListKeys', { page_size: 50 }):
   * resolves to the response object. KeyService and UsageService need an `admin` key.
   */
  call(service, method, request = {}) {
    const stub = this.services[service];
    if (!stub || typeof stub[method] !== 'function') {
      return Promise.reject(new Error(`no unary method ${service}/${method} in the contract`));
    }
    return new Promise((resolve, reject) => {
      stub[method](request, this.metadata(), this.options(), (error, response) =>
        error ? reject(error) : resolve(response),
      );
    });
  }

  metadata() {
    const metadata = new grpc.Metadata();
    if (this.apiKey) metadata.set('authorization', `Bearer ${this.apiKey}`);
    return metadata;
  }

  options() {
    return { deadline: new Date(Date.now() + this.timeoutMs) };
  }

  /** Generate: resolves to a GenerateResponse object. */
  generate(request) {
    return this.call('GenerationService', 'Generate', request);
  }

  /** StreamGenerate: an async iterable of StreamGenerateResponse objects (`event` names the kind). */
  stream(request) {
    return this.stub.StreamGenerate(request, this.metadata(), this.options());
  }

  /** ListModels: resolves to every page of the models (of one provider, if given). */
  async listModels(provider = '') {
    const models = [];
    let pageToken = '';
    do {
      const response = await this.call('GenerationService', 'ListModels', {
        provider,
        page_token: pageToken,
      });
      models.push(...response.models);
      pageToken = response.next_page_token;
    } while (pageToken);
    return models;
  }

  close() {
    this.stub.close();
  }
}

/** A GenerateRequest with one user message. */
function userRequest(model, text, extra = {}) {
  return { model, messages: [{ role: 'ROLE_USER', content: [{ text }] }], ...extra };
}

/** The text blocks of a GenerateResponse, joined. */
function responseText(response) {
  return response.content.map((block) => block.text || '').join('');
}

module.exports = { GatewayClient, loadContract, responseText, userRequest, grpc };
