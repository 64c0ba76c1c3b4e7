package stack

import (
	"context"
	"testing"
	"time"
)

// A command line whose child keeps the output pipe open still ends at
// its deadline: the whole process group is killed, not only the shell.
func TestShellDeadlineKillsGroup(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	out, err := Shell(ctx, "echo started; sleep 30 & sleep 30; echo never").CombinedOutput()
	if err == nil {
		t.Fatalf("command past its deadline succeeded: %q", out)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("the command ran %v past a 200ms deadline (a child kept the pipe)", d)
	}
	if string(out) != "started\n" {
		t.Fatalf("output %q", out)
	}
}
