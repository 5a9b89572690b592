// The HTTP side of `qalora serve` on node:http: routing (404 unknown path, 405 wrong method), the API key,
// bounded JSON bodies (413), metrics per request, and graceful shutdown (stop accepting, drain the engine
// within a deadline, then close every connection).
import { createHash, timingSafeEqual } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Tokenizer } from '../tokenizer/types.ts';
import type { ChatTemplate } from './chat-template.ts';
import type { Engine } from './engine.ts';
import { ApiError } from './errors.ts';
import { Metrics } from './metrics.ts';
import { chatCompletions, completions, internalError, sendJson, type GenerationContext } from './openai.ts';

export interface ServerOptions {
  engine: Engine;
  tokenizer: Tokenizer;
  chatTemplate: ChatTemplate;
  /** The name the model as loaded answers to in `model`. */
  baseName: string;
  adapterNames?: string[];
  /** When set, every route but /health needs `Authorization: Bearer <apiKey>`. */
  apiKey?: string;
  /** Largest request body accepted (413 beyond). Default 4 MiB. */
  maxBodyBytes?: number;
}

type Handler = (req: IncomingMessage, res: ServerResponse, body: () => Promise<unknown>) => Promise<void> | void;

const DEFAULT_MAX_BODY = 4 << 20;

function digest(s: string): Buffer {
  return createHash('sha256').update(s).digest();
}

export class QaloraServer {
  readonly http: Server;
  readonly metrics = new Metrics();
  private readonly ctx: GenerationContext;
  private readonly routes: Record<string, Record<string, Handler>>;
  private readonly keyDigest?: Buffer;
  private readonly maxBody: number;
  private readonly open = new Set<ServerResponse>();
  private closing = false;
  private readonly created = Math.floor(Date.now() / 1000);

  constructor(readonly opts: ServerOptions) {
    this.ctx = {
      engine: opts.engine, tokenizer: opts.tokenizer, chatTemplate: opts.chatTemplate, metrics: this.metrics,
      baseName: opts.baseName, adapterNames: opts.adapterNames ?? [],
    };
    if (opts.apiKey !== undefined && opts.apiKey.length === 0) throw new Error('the API key must not be empty');
    this.keyDigest = opts.apiKey ? digest(opts.apiKey) : undefined;
    this.maxBody = opts.maxBodyBytes ?? DEFAULT_MAX_BODY;
    const json = (f: (body: unknown, req: IncomingMessage, res: ServerResponse) => Promise<void>): Handler => async (req, res, body) => f(await body(), req, res);
    this.routes = {
      '/health': { GET: (_q, res) => this.health(res) },
      '/metrics': { GET: (_q, res) => this.metricsText(res) },
      '/v1/models': { GET: (_q, res) => sendJson(res, 200, { object: 'list', data: this.modelList() }) },
      '/v1/completions': { POST: json((b, q, s) => completions(this.ctx, b, q, s)) },
      '/v1/chat/completions': { POST: json((b, q, s) => chatCompletions(this.ctx, b, q, s)) },
    };
    this.http = createServer((req, res) => void this.handle(req, res));
    // Streams can be long; the defaults would cut a slow generation.
    this.http.requestTimeout = 0;
    this.http.keepAliveTimeout = 5000;
  }

  listen(port: number, host = '127.0.0.1'): Promise<AddressInfo> {
    return new Promise((resolve, reject) => {
      this.http.once('error', reject);
      this.http.listen(port, host, () => {
        this.http.off('error', reject);
        resolve(this.http.address() as AddressInfo);
      });
    });
  }

  /** Stops accepting, lets running requests finish for up to `deadlineMs`, cancels the rest, closes everything. */
  async shutdown(deadlineMs: number): Promise<{ finished: boolean; cancelled: number }> {
    this.closing = true;
    const closed = new Promise<void>((res) => this.http.close(() => res()));
    this.http.closeIdleConnections();
    const r = await this.opts.engine.drain(deadlineMs);
    // Cancelled streams still write their last event; give open responses a moment to end, then cut the rest.
    const ends = [...this.open].map((res) => new Promise<void>((done) => res.once('close', done)));
    let grace: NodeJS.Timeout | undefined;
    await Promise.race([Promise.all(ends), new Promise((res) => { grace = setTimeout(res, 1000); })]);
    clearTimeout(grace);
    this.http.closeAllConnections();
    await closed;
    return r;
  }

  private modelList(): Array<Record<string, unknown>> {
    const base = { id: this.ctx.baseName, object: 'model', created: this.created, owned_by: 'qalora', root: this.ctx.baseName, parent: null, max_model_len: this.ctx.engine.context };
    return [base, ...this.ctx.adapterNames.map((n) => ({ ...base, id: n, root: n, parent: this.ctx.baseName }))];
  }

  private health(res: ServerResponse): void {
    const s = this.opts.engine.stats();
    sendJson(res, this.closing ? 503 : 200, { status: this.closing ? 'shutting_down' : 'ok', active: s.active, queued: s.queued, slots: s.slots });
  }

  private metricsText(res: ServerResponse): void {
    const text = this.metrics.render(this.opts.engine.stats());
    res.writeHead(200, { 'Content-Type': 'text/plain; version=0.0.4; charset=utf-8', 'Content-Length': Buffer.byteLength(text) });
    res.end(text);
  }

  private authorized(req: IncomingMessage): void {
    if (!this.keyDigest) return;
    const h = req.headers.authorization;
    const m = h ? /^Bearer\s+(.+)$/i.exec(h.trim()) : null;
    if (!m) {
      throw new ApiError(401, 'Missing API key: send "Authorization: Bearer <key>"', 'invalid_request_error', 'invalid_api_key', null, { 'WWW-Authenticate': 'Bearer' });
    }
    if (!timingSafeEqual(digest(m[1]), this.keyDigest)) {
      throw new ApiError(401, 'Incorrect API key provided', 'invalid_request_error', 'invalid_api_key', null, { 'WWW-Authenticate': 'Bearer' });
    }
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const t0 = performance.now();
    const path = routePath(req.url ?? '/');
    const route = this.routes[path] ? path : path.startsWith('/v1/models/') ? '/v1/models/{id}' : 'other';
    this.open.add(res);
    res.on('close', () => {
      this.open.delete(res);
      this.metrics.request(route, req.method ?? '?', res.statusCode, (performance.now() - t0) / 1000);
    });
    if (this.closing) res.setHeader('Connection', 'close');
    try {
      if (path !== '/health') this.authorized(req);
      const byMethod = route === '/v1/models/{id}' ? { GET: this.oneModel(path.slice('/v1/models/'.length)) } : this.routes[path];
      if (!byMethod) throw new ApiError(404, `Unknown route ${req.method} ${path}`, 'invalid_request_error', 'not_found');
      const handler = byMethod[req.method ?? ''];
      if (!handler) {
        const allow = Object.keys(byMethod).join(', ');
        throw new ApiError(405, `${req.method} is not allowed on ${path}; use ${allow}`, 'invalid_request_error', 'method_not_allowed', null, { Allow: allow });
      }
      await handler(req, res, () => this.readJson(req));
    } catch (e) {
      const err = internalError(e);
      if (res.headersSent) {
        if (!res.writableEnded) res.end();
        return;
      }
      if (err.status === 413) res.setHeader('Connection', 'close');
      sendJson(res, err.status, err.body(), err.headers);
    }
  }

  private oneModel(id: string): Handler {
    return (_q, res) => {
      const m = this.modelList().find((x) => x.id === decodeURIComponent(id));
      if (!m) throw new ApiError(404, `The model '${decodeURIComponent(id)}' does not exist`, 'invalid_request_error', 'model_not_found', 'model');
      sendJson(res, 200, m);
    };
  }

  private readJson(req: IncomingMessage): Promise<unknown> {
    const limit = this.maxBody;
    const tooLarge = (n: string) => new ApiError(413, `the request body is ${n} bytes, more than the limit of ${limit}`, 'invalid_request_error', 'payload_too_large');
    const declared = Number(req.headers['content-length'] ?? NaN);
    return new Promise((resolve, reject) => {
      if (declared > limit) {
        // Answer at once; keep draining what the client still sends so it can read the answer.
        req.resume();
        return reject(tooLarge(String(declared)));
      }
      const chunks: Buffer[] = [];
      let size = 0, over = false;
      req.on('data', (c: Buffer) => {
        if (over) return;
        size += c.length;
        if (size > limit) {
          over = true;
          reject(tooLarge(`over ${limit}`));
          return;
        }
        chunks.push(c);
      });
      req.on('error', reject);
      req.on('end', () => {
        if (over) return;
        const text = Buffer.concat(chunks).toString('utf8');
        try {
          resolve(JSON.parse(text));
        } catch (e) {
          reject(new ApiError(400, `the request body is not valid JSON (${(e as Error).message})`, 'invalid_request_error', 'invalid_json'));
        }
      });
    });
  }
}

function routePath(url: string): string {
  let p: string;
  try {
    p = new URL(url, 'http://localhost').pathname;
  } catch {
    p = url;
  }
  return p.length > 1 && p.endsWith('/') ? p.slice(0, -1) : p;
}
