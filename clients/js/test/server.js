// A real Devastator server for the JS tests: a subprocess of bin/devastator on
// ephemeral ports in a temporary data directory, and the CLI to mint tokens.
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const repo = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const venvPython = join(repo, ".venv", "bin", "python");
export const python = process.env.DEVASTATOR_PYTHON || (existsSync(venvPython) ? venvPython : "python3");
const cli = join(repo, "bin", "devastator");
const START_TIMEOUT_MS = 20000;

// Servers still running when the test process exits (a test that failed before
// its cleanup) are killed, so that none outlives the run.
const running = new Set();
process.on("exit", () => {
  for (const child of running) child.kill("SIGKILL");
});

/**
 * Start a server; resolves when both endpoints listen.
 * options.env: extra DEVASTATOR_* settings; options.dataDir / httpPort / tlsPort to restart on the same ones.
 */
export async function startServer(options = {}) {
  const ownDataDir = !options.dataDir;
  const dataDir = options.dataDir || mkdtempSync(join(tmpdir(), "devastator-js-"));
  const args = [cli, "--data-dir", dataDir, "--http-port", String(options.httpPort ?? 0), "--tls-port", String(options.tlsPort ?? 0)];
  const child = spawn(python, args, {
    cwd: repo,
    env: { ...process.env, DEVASTATOR_TICK_INTERVAL: "0.1", DEVASTATOR_SQLITE_SYNCHRONOUS: "NORMAL", ...(options.env || {}) },
    stdio: ["ignore", "ignore", "pipe"],
  });
  running.add(child);
  const exited = new Promise((resolveExit) => child.once("exit", resolveExit));
  exited.then(() => running.delete(child));
  let log = "";
  const ports = await new Promise((resolvePorts, reject) => {
    const found = {};
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`server did not start in time:\n${log}`));
    }, START_TIMEOUT_MS);
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => {
      log += chunk;
      for (const match of log.matchAll(/(HTTP\/WebSocket|TLS) endpoint listening on [^\s]+:(\d+)/g)) {
        found[match[1] === "TLS" ? "tls" : "http"] = Number(match[2]);
      }
      if (found.http && found.tls && /Devastator started/.test(log)) {
        clearTimeout(timer);
        resolvePorts(found);
      }
    });
    child.once("exit", (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`server exited (${code ?? signal}) before it started:\n${log}`));
    });
  }).catch(async (error) => {
    await exited;
    if (ownDataDir) rmSync(dataDir, { recursive: true, force: true });
    throw error;
  });
  const tlsOn = /^(1|true|yes|on)$/i.test(options.env?.DEVASTATOR_WS_TLS || "");
  return {
    dataDir,
    httpPort: ports.http,
    tlsPort: ports.tls,
    url: `${tlsOn ? "wss" : "ws"}://localhost:${ports.http}/ws`,
    pageUrl: `${tlsOn ? "https" : "http"}://localhost:${ports.http}/`,
    ca: join(dataDir, "ca.pem"),
    get log() { return log; },
    /** A JWT for the user's device (both created if new), as `bin/devastator token` prints it. */
    token(user, device = "default") {
      return runCli(dataDir, ["token", user, "--device", device]).trim().split("\n").pop();
    },
    /** Run another operator command on this server's data directory; its stdout. */
    cli(...commandArgs) {
      return runCli(dataDir, commandArgs);
    },
    /** SIGKILL: nothing is shut down cleanly. */
    async kill() {
      child.kill("SIGKILL");
      await exited;
    },
    /** SIGTERM: a clean shutdown (connections get conn.close 1001). */
    async stop() {
      child.kill("SIGTERM");
      await exited;
    },
    /** Start again on the same data directory and ports. */
    restart() {
      return startServer({ ...options, dataDir, httpPort: ports.http, tlsPort: ports.tls });
    },
    remove() {
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

function runCli(dataDir, commandArgs) {
  return execFileSync(python, [cli, ...commandArgs, "--data-dir", dataDir], { cwd: repo, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}
