// A generic OIDC issuer for Keygate's federation tests (workload identity:
// Kubernetes-style service-account tokens): oauth2-mock-server over plain HTTP
// on 127.0.0.1, with discovery and JWKS at their standard paths. It lives
// beside the Azure stand-in to share its node_modules.
//
// Run with: node tests/azure/oidc-issuer.mjs
// Mint a token: POST /token grant_type=client_credentials&claims=<JSON>; the
// claims are merged into the token (e.g. sub, aud, exp).
// stdin "rotate" adds a new key; tokens then alternate between the keys, and
// the new key's kid is printed as {"kid": ...}.
// Prints one JSON line {"port", "issuer"} once it listens.
import { createInterface } from 'node:readline';
import { OAuth2Server } from 'oauth2-mock-server';

const server = new OAuth2Server();
await server.issuer.keys.generate('RS256');

server.service.on('beforeTokenSigning', (token, req) => {
  const extra = req.body.claims ? JSON.parse(req.body.claims) : {};
  delete token.payload.scope;
  Object.assign(token.payload, extra);
  if (req.body.kid) {
    token.header.kid = req.body.kid;
  }
});

await server.start(0, '127.0.0.1');
const port = server.address().port;
server.issuer.url = `http://127.0.0.1:${port}`;
console.log(JSON.stringify({ port, issuer: server.issuer.url }));

createInterface({ input: process.stdin }).on('line', async (line) => {
  if (line.trim() === 'rotate') {
    const jwk = await server.issuer.keys.generate('RS256');
    console.log(JSON.stringify({ kid: jwk.kid }));
  }
});

const stop = async () => {
  await server.stop();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
