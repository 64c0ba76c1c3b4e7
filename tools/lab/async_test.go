package lab

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestAsyncMode: a directory in async mode. A steady writer that duet does
// not supervise (fio, 20 MB/s) runs on the primary while the test samples
// the replication lag that status reports: it must be reported and stay
// bounded, and the copies must be equal once the writer stops. A writer
// under `duet exec` then makes every write durable locally without waiting
// for the peer; its records are all on the peer after a quiesce.
func TestAsyncMode(t *testing.T) {
	if _, err := exec.LookPath("fio"); err != nil {
		t.Skip("fio not installed (apt-get install fio): it is the steady writer")
	}
	b := duetBinary(t)
	l := Up(t, b)
	for _, h := range []string{"a", "b"} {
		data := map[string]string{"a": l.AData, "b": l.BData}[h]
		l.EditConfig(t, h, "    path: "+data+"\n", "    path: "+data+"\n    mode: async\n    max_lag: 500ms\n")
	}
	l.Start(t, "b")
	l.Start(t, "a")
	l.WaitSync(t, time.Minute)
	before := l.Status(t, "a")
	if len(before.Dirs) != 1 || before.Dirs[0].Mode != "async" || before.Dirs[0].MaxLagMs != 500 {
		t.Fatalf("status does not show the async mode: %+v", before.Dirs)
	}

	fio := exec.Command("fio", "--name=steady", "--filename="+filepath.Join(l.AData, "steady.dat"), "--rw=write",
		"--bs=64k", "--size=1g", "--rate=20m", "--time_based", "--runtime=6", "--ioengine=psync")
	var fioOut strings.Builder
	fio.Stdout, fio.Stderr = &fioOut, &fioOut
	if err := fio.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- fio.Wait() }()
	// What status reports while the writer runs: the RPO an operator sees.
	var maxLag float64
	samples := 0
	for running := true; running; {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("fio: %v\n%s", err, fioOut.String())
			}
			running = false
		case <-time.After(200 * time.Millisecond):
			maxLag = max(maxLag, l.Status(t, "a").LagMs)
			samples++
		}
	}
	t.Logf("async: lag reported by status during the writer, %d samples: at most %.1f ms", samples, maxLag)
	if maxLag > 2000 {
		t.Fatalf("status reported a lag of %.1f ms: not bounded", maxLag)
	}
	l.WaitSync(t, time.Minute)
	after := l.Status(t, "a")
	p99 := after.LagHistogram.Quantile(0.99, before.LagHistogram)
	acked := uint64(0)
	for i := range after.LagHistogram.Counts {
		acked += after.LagHistogram.Counts[i] - before.LagHistogram.Counts[i]
	}
	t.Logf("async: %d batches acknowledged during the 20 MB/s writer, lag p99 ≤ %g ms", acked, p99)
	if acked == 0 {
		t.Fatal("no batch acknowledged: the lag histogram does not count")
	}
	if p99 > 500 {
		t.Fatalf("replication lag p99 above %g ms: not bounded", p99)
	}
	l.Verify(t)

	// A supervised writer: each fdatasync returns without waiting for the
	// peer while the lag is under max_lag.
	writer := filepath.Join(filepath.Dir(b), "syncwriter")
	build := exec.Command("go", "build", "-o", writer, "./tools/syncwriter")
	build.Dir = repoRoot()
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building syncwriter: %v\n%s", err, out)
	}
	const n = 500
	file := filepath.Join(l.AData, "async-log")
	start := time.Now()
	out, err := l.run("exec", "a", l.Bin, "exec", "--config", filepath.Join(l.Dir, "a.yaml"), "--",
		writer, "-file", file, "-max", fmt.Sprint(n))
	if err != nil {
		t.Fatalf("supervised writer: %v\n%s", err, out)
	}
	t.Logf("async: %d records written with fdatasync under duet exec in %s", n, time.Since(start).Round(time.Millisecond))
	l.WaitSync(t, time.Minute)
	data, _ := os.ReadFile(filepath.Join(l.BData, "async-log"))
	if m := missingRecords(n, data); m != 0 {
		t.Fatalf("%d of %d records missing on nodeB after the quiesce", m, n)
	}
}
