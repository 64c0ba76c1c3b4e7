package replica

import (
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
)

// TestLagCountsChangesAResyncTookOver: a change captured 10 s ago and not
// on the peer (it was away) is the replication lag. When the peer comes
// back, the resync takes the journal over (DropSettled) and zeroed
// pendingSince, and until its first batch was queued (the whole scan, and
// the comparison: minutes on a big tree) lag() counted nothing: `duet
// status` showed lag_ms 0, duet_dir_lag_seconds 0, and an async
// directory's WaitLag (while connected) found the lag under any max_lag.
func TestLagCountsChangesAResyncTookOver(t *testing.T) {
	top := t.TempDir()
	src := filepath.Join(top, "src")
	makeScaleTree(t, src, 200, 3, 8)
	r := syncedThenStopped(t, src, filepath.Join(top, "peer"))
	// Changed while the peer was away, captured 10 s ago.
	var name string
	filepath.Walk(src, func(p string, fi os.FileInfo, err error) error {
		if err == nil && fi.Mode().IsRegular() && name == "" {
			name = p
		}
		return nil
	})
	if err := os.WriteFile(name, []byte("changed while the peer was away\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(name, &st); err != nil {
		t.Fatal(err)
	}
	captured := time.Now().Add(-10 * time.Second)

	var mu sync.Mutex
	var lagAtScan float64 = -1
	var sp *Primary
	r.resyncStep = func(step string) {
		if step == "scanned" {
			s := sp.Status()
			mu.Lock()
			if lagAtScan < 0 {
				lagAtScan = s.LagMs
			}
			mu.Unlock()
		}
	}
	r.startReplica()
	// startSource, with the change recorded before Run.
	r.startSourceWith(func(p *Primary) {
		sp = p
		p.Record(&capture.Record{Seq: 1, Ino: st.Ino, Pos: 0, Len: uint64(st.Size), Kind: capture.KindData}, captured)
		if lag := p.Status().LagMs; lag < 9000 {
			t.Fatalf("lag %v ms before the peer came back, want about 10 s", lag)
		}
	})
	r.waitSynced()
	r.cleanStop()
	mu.Lock()
	defer mu.Unlock()
	if lagAtScan < 9000 {
		t.Errorf("while the resync scanned, with a change captured 10 s ago in no batch, the lag was %v ms", lagAtScan)
	}
}
