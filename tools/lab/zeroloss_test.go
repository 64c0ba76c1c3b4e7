package lab

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestZeroLossOnPrimaryKill: a writer under `duet exec` appends records and
// fdatasyncs each one, logging (outside the replicated tree) every record
// whose fdatasync returned. At a random moment the primary's duet is killed
// with SIGKILL and its link cut. Every logged record must be on the
// secondary, which takes over; the old primary returns as secondary and
// the next iteration writes on the new primary.
func TestZeroLossOnPrimaryKill(t *testing.T) {
	b := duetBinary(t)
	writer := filepath.Join(filepath.Dir(b), "syncwriter")
	build := exec.Command("go", "build", "-o", writer, "./tools/syncwriter")
	build.Dir = repoRoot()
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building syncwriter: %v\n%s", err, out)
	}
	iterations := 20
	if s := os.Getenv("DUET_ZEROLOSS_ITERATIONS"); s != "" {
		iterations, _ = strconv.Atoi(s)
	}
	l := Up(t, b)
	l.Start(t, "b")
	l.Start(t, "a")
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	var total, lost int
	for i := 0; i < iterations; i++ {
		p := l.WaitPrimary(t, time.Minute)
		s := map[string]string{"a": "b", "b": "a"}[p]
		l.WaitSync(t, time.Minute)
		pData := map[string]string{"a": l.AData, "b": l.BData}[p]
		sData := map[string]string{"a": l.AData, "b": l.BData}[s]
		name := fmt.Sprintf("log-%02d", i)
		ack := filepath.Join(l.Dir, name+".acked")
		af, _ := os.Create(ack)
		cmd := exec.Command(l.Script, "exec", p, b, "exec", "--config", filepath.Join(l.Dir, p+".yaml"), "--",
			writer, "-file", filepath.Join(pData, name))
		cmd.Env = l.env
		cmd.Stdout = af
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(50+rng.Intn(400)) * time.Millisecond)
		// Link first: a SIGKILLed duet takes a while to die (its BPF
		// links detach), and meanwhile its host still answers for the VIP.
		l.run("exec", p, "ip", "link", "set", "eth0", "down")
		l.Kill(t, p)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			t.Fatalf("iteration %d: writer still blocked 30 s after the primary died", i)
		}
		af.Close()
		acked := readAcked(t, ack)
		replica, _ := os.ReadFile(filepath.Join(sData, name))
		missing := 0
		for n := 1; n <= acked; n++ {
			want := fmt.Sprintf("%015d\n", n)
			off := (n - 1) * 16
			if off+16 > len(replica) || string(replica[off:off+16]) != want {
				missing++
			}
		}
		t.Logf("iteration %2d: primary %s killed, %4d acknowledged, %d missing on %s (writer: %s)", i, p, acked, missing, s,
			strings.TrimSpace(lastLine(stderr.String())))
		total += acked
		lost += missing
		// The secondary takes over; the old primary comes back (as after
		// a reboot: without the VIP) and resynchronises from it.
		l.WaitState(t, s, "ALONE", 30*time.Second)
		l.run("revive", p)
		l.Start(t, p)
	}
	t.Logf("zero-loss: %d iterations, %d acknowledged records, %d lost", iterations, total, lost)
	if lost != 0 {
		t.Fatalf("%d acknowledged records lost", lost)
	}
	if total == 0 {
		t.Fatal("no record was acknowledged: the test exercised nothing")
	}
}

func readAcked(t *testing.T, path string) int {
	b, _ := os.ReadFile(path)
	lines := strings.Fields(string(b))
	if len(lines) == 0 {
		return 0
	}
	n, err := strconv.Atoi(lines[len(lines)-1])
	if err != nil {
		t.Fatalf("bad ack log %s: %v", path, err)
	}
	return n
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}
