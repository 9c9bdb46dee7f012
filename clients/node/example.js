// One unary call and one stream through the gateway, printed as JSON lines.
//
//   LLMGW_ADDRESS=localhost:50051 LLMGW_API_KEY=llmgw_... node example.js "Hello there"
//
// tests/test_node_client.py runs it against a real gateway and reads its output.
'use strict';

const { GatewayClient, responseText, userRequest } = require('./client');

async function main() {
  const address = process.env.LLMGW_ADDRESS || 'localhost:50051';
  const model = process.env.LLMGW_MODEL || 'echo';
  const prompt = process.argv[2] || 'Hello from Node';
  const client = new GatewayClient(address, { apiKey: process.env.LLMGW_API_KEY });
  try {
    const response = await client.generate(userRequest(model, prompt));
    console.log(JSON.stringify({
      call: 'Generate',
      text: responseText(response),
      stop_reason: response.stop_reason,
      usage: response.usage,
      request_id: response.request_id,
    }));

    const kinds = [];
    let text = '';
    for await (const event of client.stream(userRequest(model, prompt))) {
      kinds.push(event.event);
      if (event.event === 'content_block_delta' && event.content_block_delta.text !== undefined) {
        text += event.content_block_delta.text;
        process.stderr.write(event.content_block_delta.text);
      }
    }
    console.log(JSON.stringify({ call: 'StreamGenerate', text, events: kinds }));
  } finally {
    client.close();
  }
}

main().catch((error) => {
  // grpc-js errors carry the status code and message; the rich details are
  // in error.metadata under grpc-status-details-bin.
  console.error(`error: ${error.code} ${error.details || error.message}`);
  process.exit(1);
});
