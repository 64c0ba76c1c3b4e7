package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/duet-ha/duet/tools/lab/linearize"
)

// etcdHistory records puts and gets on a few keys of kine through the VIP,
// by several clients at once, as Jepsen's etcd test does: once the faults
// are over, the history must be linearizable (tools/lab/linearize). A
// write acknowledged and then lost by a failover, or a read served from a
// stale copy, makes it fail; counting acknowledged keys would miss the
// stale read, and a key rewritten after the loss would hide the loss.
type etcdHistory struct {
	l       *Lab
	gate    *sync.RWMutex // if set, held for reading around each operation
	keys    int
	mu      sync.Mutex
	ops     []linearize.Op
	unknown int
	wg      sync.WaitGroup
}

// linKey is the etcd key of register k.
func linKey(k int) string { return fmt.Sprintf("/lin/k%d", k) }

// startEtcdHistory makes keys registers, then starts clients that each,
// until ctx ends, get a random one of them and, one time in two, put a
// value unique to the client and its count (see client).
func startEtcdHistory(ctx context.Context, t *testing.T, l *Lab, clients, keys int, seed int64, gate *sync.RWMutex) *etcdHistory {
	t.Helper()
	h := &etcdHistory{l: l, keys: keys, gate: gate}
	// Each key is made first, by a client of its own, and read back: the
	// clients' puts are then updates, the transaction whose success kine
	// answers only after its commit. kine answers a create whose INSERT
	// failed for any reason as a success (LogStructured.Create).
	for k := 0; k < keys; k++ {
		key, value := linKey(k), fmt.Sprintf("init-%d", k)
		for try := 1; ; try++ {
			unknown := h.put(ctx, clients, key, value, 0)
			got := h.get(ctx, clients, key)
			if !got.Unknown && got.Output == value {
				break
			}
			if !unknown && !got.Unknown {
				t.Fatalf("etcd history: %s made with %q, acknowledged, then read as %q: kine acknowledged a create it did not commit", key, value, got.Output)
			}
			if try == 5 {
				t.Fatalf("etcd history: %s not made in %d tries (the last read: %q, unknown %v)", key, try, got.Output, got.Unknown)
			}
			time.Sleep(time.Second)
		}
	}
	for c := 0; c < clients; c++ {
		rng := rand.New(rand.NewSource(seed + int64(c)))
		h.wg.Add(1)
		go func() {
			defer h.wg.Done()
			h.client(ctx, c, rng)
		}()
	}
	return h
}

func (h *etcdHistory) client(ctx context.Context, id int, rng *rand.Rand) {
	for n := 0; ctx.Err() == nil; n++ {
		key := linKey(rng.Intn(h.keys))
		if h.gate != nil {
			h.gate.RLock()
		}
		// A get, then, one time in two, a put of a value unique to the
		// client and its count, made as K3S writes through kine: a
		// transaction that writes only if the key's revision is still the
		// one the get read. kine's plain put (etcdctl put) is no
		// register: it reads the key at kine's cached current revision,
		// which can lag the key's own last write, then writes on condition
		// that the key's newest row is the one it read, and answers OK
		// whether or not the write was made. With no duet and no fault,
		// 32 clients on kine v0.17.5 over MariaDB, each the only writer
		// of its key, saw 5 of 34,629 acknowledged puts missing from the
		// get that followed; writing with the transaction, 0 of 43,271
		// (docs/DESIGN.md, "The fault campaign").
		get := h.get(ctx, id, key)
		unknown := get.Unknown
		if ctx.Err() == nil && !unknown && rng.Intn(2) == 0 {
			unknown = h.put(ctx, id, key, fmt.Sprintf("c%d-%d", id, n), get.rev)
		}
		if h.gate != nil {
			h.gate.RUnlock()
		}
		if unknown {
			// The service is away: wait a little before the next try.
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// etcdctl runs etcdctl in the client's namespace against the VIP, input on
// its standard input. etcdctl 3.4's txn ignores --command-timeout: the
// context's kill, 3 s, ends it (an unknown outcome).
func (h *etcdHistory) etcdctl(ctx context.Context, input string, args ...string) ([]byte, error) {
	octx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	args = append([]string{"etcdctl", "--endpoints", "http://" + vipAddr + ":2379", "--dial-timeout", "1s", "--command-timeout", "2s"}, args...)
	return h.l.ipcInput(octx, []string{"ETCDCTL_API=3"}, input, args...)
}

// record adds op to the history.
func (h *etcdHistory) record(op linearize.Op) {
	h.mu.Lock()
	h.ops = append(h.ops, op)
	if op.Unknown {
		h.unknown++
	}
	h.mu.Unlock()
}

// revOp is a get with the revision of the value it read.
type revOp struct {
	linearize.Op
	rev int64
}

// get reads key; a failed or unreadable answer is a get of unknown
// outcome.
func (h *etcdHistory) get(ctx context.Context, id int, key string) revOp {
	op := revOp{Op: linearize.Op{Client: id, Key: key, Kind: linearize.Get, Call: time.Now()}}
	out, err := h.etcdctl(ctx, "", "get", key, "-w", "json")
	op.Return = time.Now()
	if err == nil {
		op.Output, op.rev, err = parseEtcdGet(out)
	}
	op.Unknown = err != nil
	h.record(op.Op)
	return op
}

// put writes value to key if the key's modification revision is still rev
// (0: the key does not exist), as K3S does. Only a transaction that
// succeeded is an acknowledged put; one that failed wrote nothing if kine
// is right, but kine answers a failure for an INSERT whose commit failed,
// which the database may have made: its outcome is unknown.
func (h *etcdHistory) put(ctx context.Context, id int, key, value string, rev int64) (unknown bool) {
	op := linearize.Op{Client: id, Key: key, Kind: linearize.Put, Value: value, Call: time.Now()}
	out, err := h.etcdctl(ctx, etcdTxn(key, value, rev), "txn")
	op.Return = time.Now()
	ok := false
	if err == nil {
		ok, err = parseEtcdTxn(out)
	}
	op.Unknown = err != nil || !ok
	h.record(op)
	return op.Unknown
}

// etcdTxn is etcdctl txn's input for a put of value to key if its
// modification revision is rev: the two shapes of transaction kine serves,
// a create (revision 0, nothing on failure) and an update (a get on
// failure).
func etcdTxn(key, value string, rev int64) string {
	if rev == 0 {
		return fmt.Sprintf("mod(%q) = \"0\"\n\nput %s %s\n\n\n", key, key, value)
	}
	return fmt.Sprintf("mod(%q) = \"%d\"\n\nput %s %s\n\nget %s\n\n", key, rev, key, value, key)
}

// parseEtcdTxn reads etcdctl txn's answer: SUCCESS or FAILURE on its first
// line.
func parseEtcdTxn(out []byte) (bool, error) {
	first, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	switch first {
	case "SUCCESS":
		return true, nil
	case "FAILURE":
		return false, nil
	}
	return false, fmt.Errorf("etcdctl txn answered %q", out)
}

// parseEtcdGet reads etcdctl get -w json's answer for one key: its value
// ("" if the key does not exist) and modification revision.
func parseEtcdGet(out []byte) (string, int64, error) {
	var r struct {
		Header *struct{} `json:"header"`
		Kvs    []struct {
			ModRevision int64  `json:"mod_revision"`
			Value       []byte `json:"value"`
		} `json:"kvs"`
	}
	if err := json.Unmarshal(out, &r); err != nil || r.Header == nil || len(r.Kvs) > 1 {
		return "", 0, fmt.Errorf("etcdctl get answered %q", out)
	}
	if len(r.Kvs) == 0 {
		return "", 0, nil
	}
	if r.Kvs[0].ModRevision <= 0 || len(r.Kvs[0].Value) == 0 {
		return "", 0, fmt.Errorf("etcdctl get answered %q: no revision or an empty value", out)
	}
	return string(r.Kvs[0].Value), r.Kvs[0].ModRevision, nil
}

// notCommitted turns into puts of unknown outcome the acknowledged puts
// that why says were never committed (why returns the reason, or ""): an
// acknowledgement the datastore's front end gave for a write its database
// refused (kine v0.17.5 on a full disk, stackLoad.notCommitted) says
// nothing of what a failover kept. The clients must have ended.
func (h *etcdHistory) notCommitted(t *testing.T, why func(value string, at time.Time) string) {
	t.Helper()
	h.wg.Wait()
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for i := range h.ops {
		op := &h.ops[i]
		if op.Kind != linearize.Put || op.Unknown {
			continue
		}
		if reason := why(op.Value, op.Return); reason != "" {
			if n < 5 {
				t.Logf("etcd history: put %s=%s acknowledged at %s was never committed: %s", op.Key, op.Value, op.Return.Format("15:04:05.000"), reason)
			}
			op.Unknown = true
			h.unknown++
			n++
		}
	}
	if n > 0 {
		t.Logf("etcd history: %d acknowledged puts never committed, checked as puts of unknown outcome", n)
	}
}

// check waits for the clients to end (ctx must be done) and checks the
// history; a history that is not linearizable fails the test, with
// porcupine's visualization written next to the lab's logs.
func (h *etcdHistory) check(t *testing.T) {
	t.Helper()
	v := h.verdict(t)
	t.Logf("etcd history through the VIP: %d puts and %d gets acknowledged, %d with an unknown outcome, on %d keys: %s",
		v.puts, v.gets, v.unknown, h.keys, v.info)
	if !v.ok {
		h.l.Errorf(t, "etcd history: %s", v.info)
	}
	if v.puts == 0 || v.gets == 0 {
		h.l.Errorf(t, "etcd history: %d puts and %d gets acknowledged: nothing to check", v.puts, v.gets)
	}
}

// historyVerdict is what check found.
type historyVerdict struct {
	ok                  bool
	info                string
	puts, gets, unknown int
}

// verdict waits for the clients to end and checks the history.
func (h *etcdHistory) verdict(t *testing.T) historyVerdict {
	t.Helper()
	h.wg.Wait()
	h.mu.Lock()
	defer h.mu.Unlock()
	v := historyVerdict{unknown: h.unknown}
	for _, op := range h.ops {
		if op.Unknown {
			continue
		}
		if op.Kind == linearize.Get {
			v.gets++
		} else {
			v.puts++
		}
	}
	html := filepath.Join(os.TempDir(), fmt.Sprintf("duet-etcd-history-%d.html", time.Now().UnixNano()))
	var err error
	v.ok, v.info, err = linearize.Check(h.ops, 3*time.Minute, html)
	if err != nil {
		t.Fatalf("etcd history: %v", err)
	}
	return v
}

// acknowledgedPuts counts the puts acknowledged so far.
func (h *etcdHistory) acknowledgedPuts() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, op := range h.ops {
		if op.Kind == linearize.Put && !op.Unknown {
			n++
		}
	}
	return n
}
