// Package lab drives tools/lab/lab.sh from Go tests: two hosts in network
// namespaces with their own ext4 filesystems, and duet running on them.
package lab

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/loopfs"
	"github.com/duet-ha/duet/pkg/node"
)

// Lab is a running lab.
type Lab struct {
	Dir    string // DUET_LAB
	Script string
	Bin    string
	AData  string
	BData  string
	env    []string

	mu       sync.Mutex
	failures []string // Errorf's, printed again after the logs
}

// Errorf is t.Errorf, its message also printed again after the daemons'
// logs when the test ends: a CI log cut to its head and tail keeps the
// reason a long test failed.
func (l *Lab) Errorf(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if l == nil {
		t.Error(msg)
		return
	}
	l.mu.Lock()
	l.failures = append(l.failures, msg)
	l.mu.Unlock()
	t.Error(msg)
}

// Fatalf is Errorf, then t.FailNow.
func (l *Lab) Fatalf(t testing.TB, format string, args ...any) {
	t.Helper()
	l.Errorf(t, format, args...)
	t.FailNow()
}

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "../.."))
}

// Binary returns the duet binary the lab runs: $DUET_BIN, or one built
// into dir.
func Binary(t testing.TB, dir string) string {
	t.Helper()
	if b := os.Getenv("DUET_BIN"); b != "" {
		return b
	}
	bin := filepath.Join(dir, "duet")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/duet")
	cmd.Dir = repoRoot()
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building duet: %v\n%s", err, out)
	}
	return bin
}

// Up creates a fresh lab; t.Cleanup removes it. extraEnv are NAME=value
// settings for lab.sh (e.g. DUET_RING_KIB=4).
func Up(t testing.TB, bin string, extraEnv ...string) *Lab {
	t.Helper()
	loopfs.RequireRoot(t)
	for _, tool := range []string{"ip", "losetup", "mkfs.ext4"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed: %v", tool, err)
		}
	}
	dir := filepath.Join(os.TempDir(), "duet-lab-test")
	l := &Lab{Dir: dir, Script: filepath.Join(repoRoot(), "tools/lab/lab.sh"), Bin: bin,
		AData: filepath.Join(dir, "a/data"), BData: filepath.Join(dir, "b/data")}
	l.env = append(os.Environ(), "DUET_LAB="+dir, "DUET_BIN="+bin, "DUET_LAB_SIZE=3G")
	l.env = append(l.env, extraEnv...)
	t.Cleanup(func() {
		for _, h := range []string{"a", "b"} {
			// The daemons audit the capture's marks (pkg/node,
			// auditMarks): one found stuck is a bug every test must
			// fail on, though the file it silenced was repaired.
			if b, err := os.ReadFile(filepath.Join(dir, h+".log")); err == nil {
				if lines := stuckMarkLines(b); len(lines) > 0 {
					t.Errorf("%s.log: the daemon found capture marks stuck (changes not captured until it repaired them):\n%s", h, strings.Join(lines, "\n"))
				}
			}
		}
		if t.Failed() {
			keep := filepath.Join(os.TempDir(), "duet-lab-logs", strings.ReplaceAll(t.Name(), "/", "_"))
			os.MkdirAll(keep, 0o755)
			for _, h := range []string{"a", "b"} {
				if b, err := os.ReadFile(filepath.Join(dir, h+".log")); err == nil {
					os.WriteFile(filepath.Join(keep, h+".log"), b, 0o644)
					t.Logf("--- %s.log (last 32 KiB; whole log kept in %s) ---\n%s", h, keep, tail(b, 32<<10))
				}
			}
			l.mu.Lock()
			if len(l.failures) > 0 {
				t.Logf("--- %s failed, again (each message is above the logs too) ---\n%s", t.Name(), strings.Join(l.failures, "\n"))
			}
			l.mu.Unlock()
		}
		if t.Failed() && os.Getenv("DUET_LAB_KEEP") != "" {
			t.Logf("DUET_LAB_KEEP set: lab left up in %s (tools/lab/lab.sh down with DUET_LAB=%s removes it)", dir, dir)
			return
		}
		l.run("down")
	})
	if out, err := l.run("up"); err != nil {
		t.Fatalf("lab up: %v\n%s", err, out)
	}
	return l
}

// stuckMarkLines returns the lines of log that say so (at most 5).
func stuckMarkLines(log []byte) []string {
	var out []string
	for _, line := range strings.Split(string(log), "\n") {
		if strings.Contains(line, node.StuckMarksMsg) && len(out) < 5 {
			out = append(out, line)
		}
	}
	return out
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

func (l *Lab) run(args ...string) (string, error) {
	cmd := exec.Command(l.Script, args...)
	cmd.Env = l.env
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// Start starts duet on host ("a" or "b").
func (l *Lab) Start(t testing.TB, host string, args ...string) {
	t.Helper()
	if out, err := l.run(append([]string{"start", host}, args...)...); err != nil {
		t.Fatalf("starting duet on %s: %v\n%s", host, err, out)
	}
}

// Stop stops duet on host with SIGTERM.
func (l *Lab) Stop(t testing.TB, host string) {
	t.Helper()
	if out, err := l.run("stop", host); err != nil {
		t.Fatalf("stopping duet on %s: %v\n%s", host, err, out)
	}
}

// Kill kills duet on host with SIGKILL.
func (l *Lab) Kill(t testing.TB, host string) {
	t.Helper()
	if out, err := l.run("kill", host); err != nil {
		t.Fatalf("killing duet on %s: %v\n%s", host, err, out)
	}
}

// daemonPID returns the pid of the duet daemon on host.
func (l *Lab) daemonPID(t testing.TB, host string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(l.Dir, host+".pid"))
	if err != nil {
		t.Fatalf("no duet running on %s: %v", host, err)
	}
	var pid int
	fmt.Sscan(string(b), &pid)
	return pid
}

// cpuTicks returns the user and system time of pid, in clock ticks.
func cpuTicks(t testing.TB, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatalf("reading the daemon's CPU time: %v", err)
	}
	// The fields after the command's closing parenthesis: state is the
	// 3rd of stat(5), utime the 14th and stime the 15th.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	var u, s int64
	fmt.Sscan(f[11], &u)
	fmt.Sscan(f[12], &s)
	return u + s
}

// CPUShare returns the share of one CPU the daemon on host used over d.
func (l *Lab) CPUShare(t testing.TB, host string, d time.Duration) float64 {
	t.Helper()
	pid := l.daemonPID(t, host)
	before, start := cpuTicks(t, pid), time.Now()
	time.Sleep(d)
	// 100 ticks a second (USER_HZ on Linux).
	return float64(cpuTicks(t, pid)-before) / 100 / time.Since(start).Seconds()
}

// Signal sends sig to the duet daemon on host.
func (l *Lab) Signal(t testing.TB, host string, sig syscall.Signal) {
	t.Helper()
	if err := syscall.Kill(l.daemonPID(t, host), sig); err != nil {
		t.Fatalf("signalling duet on %s: %v", host, err)
	}
}

// Duet runs the duet CLI on host with its config; it returns the output
// and the exit code.
func (l *Lab) Duet(t testing.TB, host string, args ...string) (string, int) {
	t.Helper()
	out, err := l.run(append([]string{"duet", host}, args...)...)
	if err == nil {
		return out, 0
	}
	if ee, ok := err.(*exec.ExitError); ok {
		return out, ee.ExitCode()
	}
	t.Fatalf("running duet %v on %s: %v", args, host, err)
	return out, -1
}

// WaitSync waits until the serving host reports every change applied on
// the peer.
func (l *Lab) WaitSync(t testing.TB, timeout time.Duration) {
	t.Helper()
	start := time.Now()
	host := l.WaitPrimary(t, timeout)
	out, code := l.Duet(t, host, "status", "--wait-sync", (timeout - time.Since(start)).String())
	if code != 0 {
		t.Fatalf("not in sync after %s:\n%s", timeout, out)
	}
	t.Logf("in sync after %s", time.Since(start).Round(time.Millisecond))
}

// WaitPrimary waits until one host serves (PRIM or ALONE) and returns it.
func (l *Lab) WaitPrimary(t testing.TB, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		for _, h := range []string{"a", "b"} {
			if s, err := l.TryStatus(h); err == nil && (s.State == "PRIM" || s.State == "ALONE") {
				return h
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no host serves after %s", timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// WaitState waits until host is in state.
func (l *Lab) WaitState(t testing.TB, host, state string, timeout time.Duration) node.Status {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		s, err := l.TryStatus(host)
		if err == nil && s.State == state {
			return s
		}
		if time.Now().After(deadline) {
			// Both nodes' own account of why, for the CI output.
			var both []string
			for _, h := range []string{"a", "b"} {
				out, _ := l.run("duet", h, "status")
				both = append(both, fmt.Sprintf("--- duet status on %s ---\n%s", h, out))
			}
			t.Fatalf("%s is %s (%v) after %s, want %s\n%s", host, s.State, err, timeout, state, strings.Join(both, "\n"))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TryStatus returns host's status, or an error if duet does not answer.
func (l *Lab) TryStatus(host string) (node.Status, error) {
	var s node.Status
	out, err := l.run("duet", host, "status", "--output", "json")
	if err != nil {
		return s, fmt.Errorf("%v: %s", err, out)
	}
	return s, json.Unmarshal([]byte(out), &s)
}

// AppendConfig adds YAML to host's configuration.
func (l *Lab) AppendConfig(t testing.TB, host, yaml string) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(l.Dir, host+".yaml"), os.O_APPEND|os.O_WRONLY, 0)
	if err == nil {
		_, err = f.WriteString(yaml)
		f.Close()
	}
	if err != nil {
		t.Fatal(err)
	}
}

// EditConfig replaces old with new in host's configuration.
func (l *Lab) EditConfig(t testing.TB, host, old, new string) {
	t.Helper()
	p := filepath.Join(l.Dir, host+".yaml")
	b, err := os.ReadFile(p)
	if err == nil && !strings.Contains(string(b), old) {
		err = fmt.Errorf("%q not found", old)
	}
	if err == nil {
		err = os.WriteFile(p, []byte(strings.Replace(string(b), old, new, 1)), 0o644)
	}
	if err != nil {
		t.Fatalf("editing %s: %v", p, err)
	}
}

// Status returns host's status.
func (l *Lab) Status(t testing.TB, host string) node.Status {
	t.Helper()
	out, code := l.Duet(t, host, "status", "--output", "json")
	var s node.Status
	if code != 0 || json.Unmarshal([]byte(out), &s) != nil {
		t.Fatalf("status of %s (exit %d):\n%s", host, code, out)
	}
	return s
}

// Verify runs duet verify on host a and fails the test on any difference.
func (l *Lab) Verify(t testing.TB) {
	t.Helper()
	out, code := l.Duet(t, "a", "verify")
	if code == 0 {
		t.Logf("verify: %s", strings.TrimSpace(out))
		return
	}
	// Whether the differences last, for the failure's reader: gone once
	// the copies are in sync again, "in sync" was said with changes
	// still to ship; still there, changes were missed.
	status, _ := l.Duet(t, "a", "status")
	time.Sleep(2 * time.Second)
	l.WaitSync(t, 30*time.Second)
	again, code2 := l.Duet(t, "a", "verify")
	t.Fatalf("verify exit %d:\n%s\nnodeA's status then:\n%s\nverify again, 2 s later and in sync: exit %d:\n%s",
		code, firstLines(out, 40), firstLines(status, 40), code2, firstLines(again, 40))
}

// firstLines is s cut to its first n lines.
func firstLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = append(lines[:n], fmt.Sprintf("... %d more lines", len(lines)-n))
	}
	return strings.Join(lines, "\n")
}
