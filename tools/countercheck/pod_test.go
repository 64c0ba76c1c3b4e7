package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

// podScript is the counter container's script from vagrant/counter.yaml,
// writing to file instead of /data/counter.
func podScript(t *testing.T, file string) string {
	b, err := os.ReadFile("../../vagrant/counter.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	for {
		var doc struct {
			Kind string
			Spec struct {
				Template struct {
					Spec struct {
						Containers []struct{ Command []string }
					}
				}
			}
		}
		if err := dec.Decode(&doc); err != nil {
			t.Fatalf("vagrant/counter.yaml: no Deployment with a container running sh -c: %v", err)
		}
		if cs := doc.Spec.Template.Spec.Containers; doc.Kind == "Deployment" && len(cs) == 1 && len(cs[0].Command) == 3 {
			script := cs[0].Command[2]
			if !strings.Contains(script, "/data/counter") {
				t.Fatal("vagrant/counter.yaml: the script does not write /data/counter")
			}
			return strings.ReplaceAll(script, "/data/counter", file)
		}
	}
}

// runPod runs the counter's script under busybox (the container's
// shell and tools) until it has acknowledged n values, then kills it
// (a power-off, for the file: the script fsyncs before each ack). It
// returns the run's output, the acks log.
func runPod(t *testing.T, script, acks string, n int) {
	out, err := os.Create(acks)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	cmd := exec.Command("busybox", "sh", "-c", script)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer cmd.Process.Kill()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		b, _ := os.ReadFile(acks)
		if strings.Count(string(b), "acked ") >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the counter acknowledged fewer than %d values in 30 s; its output:\n%s", n, b)
		}
	}
}

func checkFiles(t *testing.T, counter string, logs ...string) []string {
	acks := Acks{}
	for _, l := range logs {
		f, err := os.Open(l)
		if err != nil {
			t.Fatal(err)
		}
		err = acks.ReadAcks(l, f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
	}
	f, err := os.Open(counter)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	problems, summary, err := Check(f, acks)
	if err != nil {
		t.Fatal(err)
	}
	t.Log(summary)
	return problems
}

// TestPodScript runs the counter pod's own script: two runs in a row pass
// the check; when the last values a run acknowledged are lost (cut from
// the file) the next run resumes below them and the check fails.
func TestPodScript(t *testing.T) {
	if _, err := exec.LookPath("busybox"); err != nil {
		t.Skip("busybox is not installed: the counter pod's script runs under busybox (the container's shell)")
	}
	dir := t.TempDir()
	counter := filepath.Join(dir, "counter")
	script := podScript(t, counter)
	log := func(i int) string { return filepath.Join(dir, "acks"+string(rune('0'+i))) }

	runPod(t, script, log(1), 5)
	runPod(t, script, log(2), 5)
	if p := checkFiles(t, counter, log(1), log(2)); len(p) > 0 {
		t.Fatalf("two runs in a row:\n%s", strings.Join(p, "\n"))
	}

	// Lose the last three values run 2 acknowledged, and what followed.
	a := Acks{}
	f, err := os.Open(log(2))
	if err != nil {
		t.Fatal(err)
	}
	err = a.ReadAcks(log(2), f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	var lastRun []int
	for _, v := range a {
		lastRun = v
	}
	keep := fmt.Sprintf("\n%d\n", maxOf(lastRun)-3)
	b, err := os.ReadFile(counter)
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.LastIndex(b, []byte(keep))
	if i < 0 {
		t.Fatalf("no line %q in the counter file:\n%s", strings.TrimSpace(keep), b)
	}
	if err := os.WriteFile(counter, b[:i+len(keep)], 0o644); err != nil {
		t.Fatal(err)
	}
	runPod(t, script, log(3), 5)
	p := checkFiles(t, counter, log(1), log(2), log(3))
	if len(p) == 0 || !strings.Contains(strings.Join(p, "\n"), "were lost and written again") {
		t.Fatalf("lost acknowledged values written again: want the resume below them reported, got:\n%s", strings.Join(p, "\n"))
	}
	t.Log(strings.Join(p, "\n"))
}
