// Small shared pieces: fields with their violations, errors, paging, times, timelines.
import { useEffect, useRef, useState } from "preact/hooks";

export function when(stamp) {
  if (!stamp) return "";
  const date = new Date(stamp);
  return Number.isNaN(date.getTime()) ? stamp : date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}

export function shortName(value, prefix) {
  return (value || "").replace(prefix, "").replaceAll("_", " ").toLowerCase();
}

/** A labelled input; `error` (from the API's field violations) is shown under it and announced. */
export function Field({ id, label, hint, error, children }) {
  const help = [hint ? `${id}-hint` : "", error ? `${id}-error` : ""].filter(Boolean).join(" ");
  const control = children({ id, "aria-describedby": help || undefined, "aria-invalid": error ? "true" : undefined });
  return (
    <div class={`field${error ? " invalid" : ""}`}>
      <label for={id}>{label}</label>
      {control}
      {hint && (
        <p class="hint" id={`${id}-hint`}>
          {hint}
        </p>
      )}
      {error && (
        <p class="field-error" id={`${id}-error`}>
          {error}
        </p>
      )}
    </div>
  );
}

export function ErrorBox({ error }) {
  if (!error) return null;
  return (
    <p class="error" role="alert">
      {error.summary || String(error.message || error)}
    </p>
  );
}

export function Notice({ children }) {
  return (
    <p class="notice" role="status">
      {children}
    </p>
  );
}

/** Pages through an AIP-158 list: `load(token)` answers {items, next}. */
export function usePaged(load, deps) {
  const [tokens, setTokens] = useState([""]);
  const [page, setPage] = useState({ items: [], next: "" });
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(true);
  const token = tokens[tokens.length - 1];
  const run = useRef(0);

  async function refresh(current = token) {
    const mine = ++run.current;
    setBusy(true);
    try {
      const result = await load(current);
      if (mine === run.current) {
        setPage(result);
        setError(null);
      }
    } catch (err) {
      if (mine === run.current) setError(err);
    } finally {
      if (mine === run.current) setBusy(false);
    }
  }

  useEffect(() => {
    setTokens([""]);
    refresh("");
  }, deps);

  return {
    ...page,
    error,
    busy,
    pageNumber: tokens.length,
    refresh: () => refresh(),
    older: () => {
      setTokens([...tokens, page.next]);
      refresh(page.next);
    },
    newer: () => {
      const back = tokens.slice(0, -1);
      setTokens(back);
      refresh(back[back.length - 1]);
    },
  };
}

export function Pager({ paged, noun }) {
  return (
    <nav class="pager" aria-label={`${noun} pages`}>
      <button type="button" onClick={paged.newer} disabled={paged.pageNumber === 1 || paged.busy}>
        ← Newer
      </button>
      <span>Page {paged.pageNumber}</span>
      <button type="button" onClick={paged.older} disabled={!paged.next || paged.busy}>
        Older →
      </button>
      <button type="button" class="quiet" onClick={paged.refresh} disabled={paged.busy}>
        Refresh
      </button>
    </nav>
  );
}

/** Events oldest first: [{at, label, tone}] with tone ok | bad | wait. */
export function Timeline({ events }) {
  const shown = events.filter((e) => e.at).sort((a, b) => new Date(a.at) - new Date(b.at));
  return (
    <ol class="timeline">
      {shown.map((e) => (
        <li class={e.tone || ""} key={`${e.label}-${e.at}`}>
          <span class="what">{e.label}</span>
          <time datetime={e.at}>{when(e.at)}</time>
        </li>
      ))}
    </ol>
  );
}

export function Status({ value, prefix }) {
  const name = shortName(value, prefix);
  const tone =
    { sent: "ok", delivered: "ok", approved: "ok", pending: "wait", queued: "wait", held: "wait" }[name] || "bad";
  return <span class={`badge ${tone}`}>{name}</span>;
}

/** Re-runs `tick` every `ms` while the tab is visible (polite polling). */
export function usePoll(tick, ms, deps) {
  useEffect(() => {
    let stopped = false;
    let timer = 0;
    async function loop() {
      if (stopped) return;
      if (document.visibilityState === "visible") {
        try {
          await tick();
        } catch {
          // The view shows its own errors; polling goes on.
        }
      }
      timer = setTimeout(loop, ms);
    }
    loop();
    return () => {
      stopped = true;
      clearTimeout(timer);
    };
  }, deps);
}
