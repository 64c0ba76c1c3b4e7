package main

import (
	"encoding/json"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestQuickBench runs the benchmark tool on small sizes (--quick --json;
// the scale figure on 8,000 files, MariaDB at 4 threads only) and checks that every figure is produced and parses; it does not judge
// the figures (one quick run on a shared VM says little).
func TestQuickBench(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the benchmark builds the lab (namespaces, loop devices)")
	}
	for _, tool := range []string{"fio", "rsync", "lsyncd", "git", "ip", "mkfs.ext4", "mariadbd", "sysbench", "ganesha.nfsd", "rpcbind"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (.ci/run installs it): %v", tool, err)
		}
	}
	root, _ := filepath.Abs("../..")
	bin := filepath.Join(t.TempDir(), "duet")
	build := exec.Command("go", "build", "-o", bin, "./cmd/duet")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building duet: %v\n%s", err, out)
	}
	cmd := exec.Command("go", "run", "./tools/bench", "--quick", "--json")
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "DUET_BIN="+bin)
	out, err := cmd.Output()
	if err != nil {
		stderr := ""
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("bench --quick --json: %v\n%s\n%s", err, out, stderr)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	var figs []Figure
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &figs); err != nil {
		t.Fatalf("bench output does not parse: %v\n%s", err, out)
	}
	want := []string{"capture overhead", "wire bytes", "many small files", "4 KiB random write + fdatasync", "4 KiB appends + fdatasync", "64 KiB sequential writes",
		"async directory", "async replication lag", "resync time", "resync bytes on the wire", "duet / lsyncd",
		"MariaDB sysbench oltp_write_only", "p95 transaction latency", "as nodeA's service under duet sync", "NFSv3 4 KiB WRITE + COMMIT", "NFSv3 64 KiB sequential", "TLS link / plaintext link",
		"initial sync of a fresh pair", "peak RSS during the initial sync", "peak RSS during steady replication", "clean restart of both daemons",
		"crash restart", "duet verify / rsync", "a file created every 2 ms", "same churn, p99", "CPU seconds / the churn's",
		"failover: kill of the primary host"}
	for _, w := range want {
		found := false
		for _, f := range figs {
			found = found || strings.Contains(f.Name, w)
		}
		if !found {
			t.Errorf("no figure %q in the output", w)
		}
	}
	for _, f := range figs {
		bad := len(f.Ratio) == 0 || len(f.Ratio) != len(f.Measured) || f.Target == ""
		for _, r := range f.Ratio {
			bad = bad || math.IsNaN(r) || math.IsInf(r, 0) || r <= 0
		}
		if bad {
			t.Errorf("figure %q: ratio %v, target %q", f.Name, f.Ratio, f.Target)
		}
		t.Logf("%s: %.3f (target %s)", f.Name, f.Ratio[0], f.Target)
	}
}
