// The admin services from Node: a key made, used, counted and revoked, printed as JSON lines.
//
//   LLMGW_ADDRESS=localhost:50051 LLMGW_ADMIN_KEY=llmgw_... node admin-example.js
//
// LLMGW_ADMIN_KEY is a key with the `admin` scope. The new key's secret is
// used once and never printed. tests/test_node_client.py runs it against a
// real gateway and reads its output.
'use strict';

const { GatewayClient, userRequest } = require('./client');

async function main() {
  const address = process.env.LLMGW_ADDRESS || 'localhost:50051';
  const model = process.env.LLMGW_MODEL || 'echo';
  const admin = new GatewayClient(address, { apiKey: process.env.LLMGW_ADMIN_KEY });
  try {
    const created = await admin.call('KeyService', 'CreateKey', {
      name: 'from-node',
      models: [model],
      lifetime: { seconds: 3600 },
    });
    const key = created.key;
    console.log(JSON.stringify({
      call: 'CreateKey',
      id: key.id,
      state: key.state,
      models: key.models,
      secret_returned: created.secret.startsWith('llmgw_'),
    }));

    const service = new GatewayClient(address, { apiKey: created.secret });
    try {
      await service.generate(userRequest(model, 'Hello from a key made in Node'));
    } finally {
      service.close();
    }

    const usage = await admin.call('UsageService', 'GetUsage', {
      group_by: 'USAGE_GROUPING_KEY',
      key_id: key.id,
    });
    console.log(JSON.stringify({ call: 'GetUsage', totals: usage.totals }));

    const listed = await admin.call('KeyService', 'ListKeys', { page_size: 100 });
    console.log(JSON.stringify({ call: 'ListKeys', ids: listed.keys.map((k) => k.id) }));

    const revoked = await admin.call('KeyService', 'RevokeKey', { key_id: key.id });
    console.log(JSON.stringify({ call: 'RevokeKey', id: revoked.key.id, state: revoked.key.state }));
  } finally {
    admin.close();
  }
}

main().catch((error) => {
  console.error(`error: ${error.code} ${error.details || error.message}`);
  process.exit(1);
});
