package lab

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/duet-ha/duet/tools/lab/linearize"
)

// The campaign's history checker sees a lost acknowledged put through the
// real stack (etcdctl, the VIP, kine, MariaDB): the newest row of each key
// is deleted from kine's table behind its back, as a failover that lost
// the last commits would leave it, the clients go on, and the history must
// not be linearizable. A checker that passed here could not see the loss
// it is there for.
func TestEtcdHistorySeesLostPut(t *testing.T) {
	l := k3sLab(t)
	var gate sync.RWMutex
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	hist := startEtcdHistory(ctx, t, l, 3, 6, time.Now().UnixNano(), &gate)
	deadline := time.Now().Add(time.Minute)
	for hist.acknowledgedPuts() < 30 {
		if time.Now().After(deadline) {
			t.Fatalf("%d puts acknowledged in a minute", hist.acknowledgedPuts())
		}
		time.Sleep(100 * time.Millisecond)
	}
	// No operation in flight: a client between its get and its
	// transaction would see its revision gone and fail, not lose.
	gate.Lock()
	hist.mu.Lock()
	before := slices.Clone(hist.ops)
	hist.mu.Unlock()
	var keys []string
	for k := 0; k < 6; k++ {
		keys = append(keys, fmt.Sprintf("'%s'", linKey(k)))
	}
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	// The newest row of each key, and how many that removed.
	out, err := l.mysql(dctx, "DELETE k FROM kine k JOIN (SELECT name, MAX(id) AS id FROM kine WHERE name IN ("+strings.Join(keys, ",")+
		") GROUP BY name) m ON k.id = m.id; SELECT ROW_COUNT()")
	cancel()
	gate.Unlock()
	if err != nil {
		t.Fatalf("deleting the newest rows: %v\n%s", err, out)
	}
	if n := strings.TrimSpace(string(out)); n != strconv.Itoa(len(keys)) {
		t.Fatalf("deleting the newest row of each of the %d keys deleted %s rows", len(keys), n)
	}
	// What the clients saw until then is linearizable: the failure below
	// is the deleted rows'.
	if ok, info, err := linearize.Check(before, time.Minute, ""); err != nil || !ok {
		t.Fatalf("the history before the rows were deleted: %s (%v)", info, err)
	}
	time.Sleep(3 * time.Second)
	stop()
	v := hist.verdict(t)
	t.Logf("%d puts and %d gets acknowledged, %d with an unknown outcome: %s", v.puts, v.gets, v.unknown, v.info)
	if _, html, ok := strings.Cut(v.info, "visualization: "); ok {
		os.Remove(html) // the failure meant here
	}
	if v.ok {
		t.Fatal("the history is linearizable after acknowledged puts were deleted: the checker cannot see a lost write")
	}
	if !strings.Contains(v.info, "not linearizable") {
		t.Fatalf("the checker did not decide: %s", v.info)
	}
}
