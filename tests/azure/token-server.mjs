// The Entra token endpoint stand-in for Keygate's Azure tests: oauth2-mock-server
// over HTTPS on Entra's paths, issuing RS256 client-credentials tokens shaped
// like Entra's v2 tokens, and refusing unknown apps and wrong secrets as
// Entra does. The test harness (tests/common/azure.rs) starts it.
//
// Run with: node tests/azure/token-server.mjs CONFIG.json
// CONFIG.json: { "key": PEM path, "cert": PEM path, "tenant": tenant id,
//   "clients": { "<client id>": { "secret": "..." | null, "lifetime": seconds } } }
// A client with a null secret authenticates with a client assertion
// (workload identity), checked as Entra checks it against the app's federated
// identity credential: "federated": { "issuer", "subject", "audience", "jwk" }
// (the workload issuer's public key): its type, an ES256 signature by that
// key, exactly that iss, sub and aud, and its time range.
// Prints one JSON line {"port", "issuer"} once it listens on 127.0.0.1.
import { createPublicKey, verify } from 'node:crypto';
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

const JWT_BEARER = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';

// Why Entra would refuse a federated assertion for `fic`; null when it would
// accept it.
function assertionRefusal(body, fic) {
  if (body.client_assertion_type !== JWT_BEARER) {
    return [400, 'invalid_request', 50027, 'JWT token is invalid or malformed.'];
  }
  const parts = String(body.client_assertion).split('.');
  let header, claims;
  try {
    [header, claims] = parts.slice(0, 2).map((p) => JSON.parse(Buffer.from(p, 'base64url')));
  } catch {
    return [400, 'invalid_request', 50027, 'JWT token is invalid or malformed.'];
  }
  const key = createPublicKey({ key: fic.jwk, format: 'jwk' });
  const signed = parts.length === 3 && header.alg === 'ES256' && verify(
    'sha256', Buffer.from(`${parts[0]}.${parts[1]}`), { key, dsaEncoding: 'ieee-p1363' },
    Buffer.from(parts[2], 'base64url'));
  if (!signed) {
    return [401, 'invalid_client', 50013, 'Assertion failed signature validation.'];
  }
  const aud = [].concat(claims.aud ?? []);
  if (claims.iss !== fic.issuer || claims.sub !== fic.subject || !aud.includes(fic.audience)) {
    return [400, 'invalid_request', 70021,
      `No matching federated identity record found for presented assertion. Assertion Issuer: '${claims.iss}'. Assertion Subject: '${claims.sub}'. Assertion Audience: '${aud.join(',')}'.`];
  }
  const now = Math.floor(Date.now() / 1000);
  if (!(claims.exp > now) || (claims.nbf !== undefined && claims.nbf > now + 300)) {
    return [401, 'invalid_client', 700024, `Client assertion is not within its valid time range. Current time: ${new Date(now * 1000).toISOString()}, expiry time of assertion ${new Date(claims.exp * 1000).toISOString()}.`];
  }
  return null;
}

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
  if (client.secret === null) {
    const refused = assertionRefusal(body, client.federated);
    if (refused) return refused;
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
