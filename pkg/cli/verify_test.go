package cli

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/peerlink"
	"github.com/duet-ha/duet/pkg/replica"
)

// The progress of verify's two scans: counts only until one side is
// done, then the other against it (≈, the peer sends no total).
func TestScansProgress(t *testing.T) {
	tests := []struct {
		name        string
		local, peer scanCount
		elapsed     time.Duration
		frac        float64
		text        string
	}{
		{"nothing yet", scanCount{}, scanCount{}, 0, 0,
			"local 0 entries, 0 B; peer 0 entries, 0 B; 0s"},
		{"both scanning: no total", scanCount{1200, 5 << 20, false}, scanCount{800, 3 << 20, false}, 12400 * time.Millisecond, 0,
			"local 1200 entries, 5.0 MiB; peer 800 entries, 3.0 MiB; 12s"},
		{"local done: the peer against it", scanCount{5000, 20 << 20, true}, scanCount{3000, 12 << 20, false}, 40 * time.Second, 0.6,
			"local 5000 entries, 20.0 MiB, done; peer 3000 of ≈5000 entries, 12.0 MiB of ≈20.0 MiB; 40s"},
		{"peer done first: local against it", scanCount{1000, 1 << 20, false}, scanCount{4000, 8 << 20, true}, 90 * time.Second, 0.25,
			"local 1000 of ≈4000 entries, 1.0 MiB of ≈8.0 MiB; peer 4000 entries, 8.0 MiB, done; 1m30s"},
		{"peer past the estimate", scanCount{100, 1000, true}, scanCount{120, 1200, false}, time.Second, 1,
			"local 100 entries, 1000 B, done; peer 120 of ≈100 entries, 1.2 KiB of ≈1000 B; 1s"},
		{"both done", scanCount{100, 1000, true}, scanCount{100, 1000, true}, time.Second, 1,
			"local 100 entries, 1000 B, done; peer 100 entries, 1000 B, done; 1s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			frac, text := scansProgress(tt.local, tt.peer, tt.elapsed)
			if frac != tt.frac || text != tt.text {
				t.Errorf("got %v %q, want %v %q", frac, text, tt.frac, tt.text)
			}
		})
	}
}

// Off a terminal, verify's progress is a line at a time, each naming the
// directory: something a log keeps.
func TestShowScansLines(t *testing.T) {
	sc := &scans{}
	sc.localAdd(100)
	sc.localAdd(0)
	sc.localDone()
	sc.peerAt(1, 50)
	pr, pw := io.Pipe()
	stop := showScans(pw, "data", sc, time.Millisecond)
	line, err := bufio.NewReader(pr).ReadString('\n')
	pr.Close() // the lines after this one fail to write
	stop(true)
	const want = "verify data: local 2 entries, 100 B, done; peer 1 of ≈2 entries, 50 B of ≈100 B; "
	if err != nil || !strings.HasPrefix(line, want) || !strings.HasSuffix(line, "s\n") {
		t.Fatalf("line %q (%v), want %q and the time elapsed", line, err, want)
	}
}

// verify against a peer's daemon: stdout holds the result and each
// difference and nothing else (scripts parse it), exit 0 when identical
// and 1 when not.
func TestVerifyAgainstPeer(t *testing.T) {
	lk, err := peerlink.New(peerlink.Options{Node: "nodeB", Keys: [][]byte{[]byte("0123456789abcdef")}})
	if err != nil {
		t.Fatal(err)
	}
	peerData := filepath.Join(t.TempDir(), "data")
	if err := os.Mkdir(peerData, 0o755); err != nil {
		t.Fatal(err)
	}
	srv := &replica.Server{Link: lk, StateDir: t.TempDir(), Dirs: []replica.Dir{{Name: "data", Path: peerData}}, Log: slog.New(slog.DiscardHandler)}
	// Not 127.0.0.1: the configuration refuses a peer at a local address.
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.Serve(ctx, ln)
	}()
	t.Cleanup(func() {
		cancel()
		<-served
		srv.Close(10 * time.Second)
	})
	cfg := writeConfig(t, func(s string) string {
		return strings.Replace(s, "peer: 127.0.0.2:1", "peer: "+ln.Addr().String(), 1)
	})
	localData := filepath.Join(filepath.Dir(cfg), "data")
	for _, dir := range []string{localData, peerData} {
		for name, content := range map[string]string{"a": "alpha", "b": "bravo"} {
			if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	verify := func(args ...string) (stdout, stderr string, code int) {
		var out, errs bytes.Buffer
		code = Main(IOStreams{In: strings.NewReader(""), Out: &out, Err: &errs}, append([]string{"verify", "--config", cfg}, args...))
		return out.String(), errs.String(), code
	}
	out, errs, code := verify()
	if code != 0 || !strings.HasPrefix(out, "data: identical (3 entries, ") || strings.Count(out, "\n") != 1 {
		t.Fatalf("identical copies: exit %d, stdout %q, stderr %q", code, out, errs)
	}
	if err := os.WriteFile(filepath.Join(peerData, "b"), []byte("BRAVO"), 0o644); err != nil {
		t.Fatal(err)
	}
	out, errs, code = verify("--quiet")
	if want := "data: \"b\": content differs at offset 0\n"; code != 1 || out != want || errs != "duet: 1 differences\n" {
		t.Fatalf("b differs: exit %d, stdout %q, stderr %q; want exit 1, stdout %q", code, out, errs, want)
	}
}
