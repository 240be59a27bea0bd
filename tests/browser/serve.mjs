// A static file server for dist/ (the page, the wasm module, the workers, the model), shared by
// the browser test and the browser benchmark. `?csp` in a URL serves that file with a
// Content-Security-Policy that forbids Web Workers.
import { createServer } from "node:http";
import { existsSync, readFileSync } from "node:fs";
import { extname, join, resolve } from "node:path";

const types = {
  ".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
  ".css": "text/css", ".json": "application/json",
};

/** Serve `dir` on 127.0.0.1 (a free port): `{ url, close }`. */
export async function serve(dir) {
  const root = resolve(dir);
  const server = createServer((req, res) => {
    const path = join(root, decodeURIComponent(new URL(req.url, "http://x").pathname));
    const file = path.endsWith("/") ? join(path, "index.html") : path;
    if (!file.startsWith(root) || !existsSync(file)) {
      res.writeHead(404).end("not found");
      return;
    }
    const headers = { "content-type": types[extname(file)] ?? "application/octet-stream" };
    if (/[?&]csp\b/.test(req.url)) headers["content-security-policy"] = "worker-src 'none'";
    res.writeHead(200, headers);
    res.end(readFileSync(file));
  });
  await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
  return { url: `http://127.0.0.1:${server.address().port}/`, close: () => server.close() };
}

/** Chromium's flags for a headless run here; WebGPU (SwiftShader) only when asked. */
export function chromiumArgs(userDataDir, webgpu) {
  const args = [
    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    `--user-data-dir=${userDataDir}`,
  ];
  // Without --enable-unsafe-webgpu, Chromium on Linux offers no WebGPU adapter.
  if (webgpu) args.push("--enable-unsafe-webgpu");
  return args;
}
