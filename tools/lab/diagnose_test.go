package lab

import (
	"bytes"
	"github.com/duet-ha/duet/pkg/node"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestNewestEntriesOrder: the diagnosis lists a directory's entries
// newest ctime first.
func TestNewestEntriesOrder(t *testing.T) {
	dir := t.TempDir()
	for _, name := range []string{"f-1", "f-2", "f-3"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(name), 0o644); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	out := newestEntries(dir, 2)
	if !strings.Contains(out, "3 entries") || strings.Index(out, "f-3") > strings.Index(out, "f-2") || strings.Contains(out, "f-1") {
		t.Fatalf("newest two of three, newest first:\n%s", out)
	}
}

// TestStuckMarkLines: the lab finds the daemon's report of stuck capture
// marks in its log, by the message the daemon writes.
func TestStuckMarkLines(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	log.Info("replication connected")
	log.Error(node.StuckMarksMsg+": those files' changes were not captured since", "inodes", 1)
	if got := stuckMarkLines(buf.Bytes()); len(got) != 1 {
		t.Errorf("found %d lines in %q, want 1", len(got), buf.String())
	}
	if got := stuckMarkLines([]byte("level=INFO msg=\"in sync\"\n")); len(got) != 0 {
		t.Errorf("found %v in a log without it", got)
	}
}
