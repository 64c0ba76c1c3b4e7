package lab

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestChurnDeleteRecreate deletes a whole tree and at once builds a new
// random one at the same path (creates, renames, links, odd names), round
// after round, while duet replicates: new inodes reuse the names of gone
// ones, directories vanish under files still queued for shipping. The
// peer must never refuse a batch, and the copies must end identical.
func TestChurnDeleteRecreate(t *testing.T) {
	b := duetBinary(t)
	l := Up(t, b)
	l.Start(t, "b")
	l.Start(t, "a")
	l.WaitState(t, "b", "SECOND", time.Minute)
	for _, seed := range []int64{1, 2, 3} {
		const rounds = 10
		for round := 0; round < rounds; round++ {
			tree := filepath.Join(l.AData, "w")
			if err := os.RemoveAll(tree); err != nil {
				t.Fatal(err)
			}
			if err := os.Mkdir(tree, 0o755); err != nil {
				t.Fatal(err)
			}
			// Nested the way applications build trees: a directory
			// made, filled, renamed into place.
			sub := filepath.Join(tree, fmt.Sprintf("ünï-日本-d%d_%d-é🙂", seed, round))
			os.Mkdir(sub, 0o755)
			NewWorkload(sub, seed*1000+int64(round)).Run(200)
			NewWorkload(tree, seed*1000+int64(round)+500).Run(200)
		}
		l.WaitSync(t, 2*time.Minute)
		sa := l.Status(t, "a")
		for _, d := range sa.Dirs {
			if strings.Contains(d.LastError, "cannot apply") {
				t.Errorf("seed %d: the peer refused a batch during the churn: %s", seed, d.LastError)
			}
		}
		if sb := l.Status(t, "b"); sb.State != "SECOND" {
			t.Errorf("seed %d: nodeB is %s after the churn, want SECOND", seed, sb.State)
		}
		l.Verify(t)
		t.Logf("churn seed %d: %d rounds of delete + recreate, %d records, %d full syncs, peer refusals: none",
			seed, rounds, sa.Dirs[0].Records, sa.Dirs[0].FullSyncs)
	}
}
