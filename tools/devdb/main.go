// Command devdb runs a real MongoDB-wire server for development and tests:
// FerretDB v1 embedded, on the SQLite backend, telemetry off, loopback only.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/http"
	_ "net/http/pprof" // served only with -pprof
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:27017", "TCP address to listen on (loopback only)")
	dataDir := flag.String("data", ".cache/devdb/data", "directory for the SQLite files")
	logLevel := flag.String("log-level", "warn", "log level: debug, info, warn, error")
	pprofAddr := flag.String("pprof", "", "serve Go's pprof profiles on this address (off when empty; for profiling the database)")
	disablePushdown := flag.Bool("disable-pushdown", false, "filter every query in Go over whole collections, using no index (for comparing answers)")
	flag.Parse()

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "devdb: bad -log-level %q: %v\n", *logLevel, err)
		os.Exit(2)
	}
	logger := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	dir, err := filepath.Abs(*dataDir)
	if err == nil {
		err = os.MkdirAll(dir, 0o700)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "devdb: data directory %q: %v\n", *dataDir, err)
		os.Exit(1)
	}

	f, err := ferretdb.New(&ferretdb.Config{
		Listener: ferretdb.ListenerConfig{TCP: *listen},
		Logger:   logger,
		Handler:  "sqlite",
		// WAL (FerretDB's default) with synchronous=NORMAL: commits survive a crash of this
		// process, and a power loss may drop the last ones; a full fsync per commit would make
		// every write wait on the disk, which a development database does not need.
		SQLiteURL:       "file:" + dir + "/?_pragma=synchronous(normal)",
		DisablePushdown: *disablePushdown,
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "devdb: %v\n", err)
		os.Exit(1)
	}

	if *pprofAddr != "" {
		go func() { fmt.Fprintf(os.Stderr, "devdb: pprof: %v\n", http.ListenAndServe(*pprofAddr, nil)) }() //nolint:gosec // loopback debugging only
	}

	// Collect garbage after the heap grows by 400% instead of 100% (unless GOGC says otherwise):
	// decoding stored JSON allocates a lot, and at the default a busy database spends a tenth of
	// its CPU collecting; a development database can afford the memory.
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(400)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	fmt.Fprintf(os.Stderr, "devdb: listening on %s (mongodb://%s/), data in %s\n", *listen, *listen, dir)
	if err := f.Run(ctx); err != nil && ctx.Err() == nil {
		fmt.Fprintf(os.Stderr, "devdb: %v\n", err)
		os.Exit(1)
	}
}
