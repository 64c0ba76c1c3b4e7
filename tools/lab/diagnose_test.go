package lab

import (
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
