// Builds the web console into console/dist (git-ignored): one hashed script and one hashed
// stylesheet, and an index.html that references them. Nothing inline, so the edge can serve the
// pages under a strict Content-Security-Policy; nothing fetched at run time.
import { build } from "esbuild";
import { createHash } from "node:crypto";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "dist");

const result = await build({
  entryPoints: [join(here, "src", "main.jsx")],
  bundle: true,
  minify: true,
  format: "esm",
  target: ["es2022"],
  jsx: "automatic",
  jsxImportSource: "preact",
  write: false,
  legalComments: "none",
  logLevel: "warning",
});
const script = result.outputFiles[0].contents;
const style = await readFile(join(here, "src", "console.css"));
const hashed = (name, ext, bytes) => `${name}.${createHash("sha256").update(bytes).digest("hex").slice(0, 12)}.${ext}`;
const scriptName = hashed("console", "js", script);
const styleName = hashed("console", "css", style);
const icon = await readFile(join(here, "src", "icon.svg"));
const page = (await readFile(join(here, "src", "index.html"), "utf8"))
  .replace("%SCRIPT%", `assets/${scriptName}`)
  .replace("%STYLE%", `assets/${styleName}`);

await rm(out, { recursive: true, force: true });
await mkdir(join(out, "assets"), { recursive: true });
await writeFile(join(out, "assets", scriptName), script);
await writeFile(join(out, "assets", styleName), style);
await writeFile(join(out, "assets", "icon.svg"), icon);
await writeFile(join(out, "index.html"), page);
console.log(`console: built ${scriptName} (${script.length} bytes), ${styleName}`);
