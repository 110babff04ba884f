// The Entra token endpoint stand-in for Keygate's Azure tests: oauth2-mock-server
// over HTTPS on Entra's paths, issuing RS256 client-credentials tokens shaped
// like Entra's v2 tokens, and refusing unknown apps and wrong secrets as
// Entra does. The test harness (tests/common/azure.rs) starts it.
//
// Run with: node tests/azure/token-server.mjs CONFIG.json
// CONFIG.json: { "key": PEM path, "cert": PEM path, "tenant": tenant id,
//   "clients": { "<client id>": { "secret": "..." | null, "lifetime": seconds } } }
// A client with a null secret authenticates with a client assertion
// (workload identity); the assertion itself is not checked.
// Prints one JSON line {"port", "issuer"} once it listens on 127.0.0.1.
import { readFileSync } from 'node:fs';
import { OAuth2Server } from 'oauth2-mock-server';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const tenant = config.tenant;
const server = new OAuth2Server(config.key, config.cert, {
  endpoints: {
    token: `/${tenant}/oauth2/v2.0/token`,
    jwks: `/${tenant}/discovery/v2.0/keys`,
    wellKnownDocument: `/${tenant}/v2.0/.well-known/openid-configuration`,
  },
});
await server.issuer.keys.generate('RS256');

// What Entra would refuse, as Entra words it; null when it would issue.
function refusal(body) {
  const client = config.clients[body.client_id];
  if (body.grant_type !== 'client_credentials') {
    return [400, 'unsupported_grant_type', 70003, 'The app requested an unsupported grant type.'];
  }
  if (!client) {
    return [400, 'unauthorized_client', 700016,
      `Application with identifier '${body.client_id}' was not found in the directory '${tenant}'.`];
  }
  if (client.secret !== null && body.client_secret !== client.secret) {
    return [401, 'invalid_client', 7000215,
      `Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '${body.client_id}'.`];
  }
  if (client.secret === null && !body.client_assertion) {
    return [401, 'invalid_client', 7000216, "'client_assertion', 'client_secret' or 'request' is required for the 'client_credentials' grant type."];
  }
  if (typeof body.scope !== 'string' || !body.scope.endsWith('/.default') || body.scope.includes(' ')) {
    return [400, 'invalid_scope', 1002012, `The provided value for scope ${body.scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).`];
  }
  return null;
}

server.service.on('beforeTokenSigning', (token, req) => {
  const body = req.body;
  const client = config.clients[body.client_id];
  const iat = token.payload.iat;
  Object.assign(token.payload, {
    aud: String(body.scope ?? '').replace(/\/\.default$/, ''),
    azp: body.client_id,
    appid: body.client_id,
    tid: tenant,
    sub: body.client_id,
    ver: '2.0',
    exp: iat + (client?.lifetime ?? 3600),
  });
  delete token.payload.scope;
});

server.service.on('beforeResponse', (response, req) => {
  const refused = refusal(req.body);
  if (refused) {
    const [status, error, code, description] = refused;
    response.statusCode = status;
    response.body = {
      error,
      error_description: `AADSTS${code}: ${description}`,
      error_codes: [code],
    };
    return;
  }
  const client = config.clients[req.body.client_id];
  response.body.expires_in = client.lifetime ?? 3600;
  response.body.ext_expires_in = response.body.expires_in;
  delete response.body.scope;
});

await server.start(0, '127.0.0.1');
const port = server.address().port;
server.issuer.url = `https://127.0.0.1:${port}/${tenant}/v2.0`;
console.log(JSON.stringify({ port, issuer: server.issuer.url }));

const stop = async () => {
  await server.stop();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
