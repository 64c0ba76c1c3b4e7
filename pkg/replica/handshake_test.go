package replica

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/wire"
)

func TestRateLog(t *testing.T) {
	t0 := time.Unix(1000, 0)
	var r rateLog
	for i, step := range []struct {
		at   time.Duration // after t0
		ok   bool
		held int
	}{
		{0, true, 0},                 // the first goes out
		{time.Second, false, 0},      // held back
		{9 * time.Second, false, 0},  // held back
		{10 * time.Second, true, 2},  // an interval after the last report: out, standing for two more
		{11 * time.Second, false, 0}, // held back again
		{time.Minute, true, 1},
		{2 * time.Minute, true, 0}, // nothing held since
	} {
		ok, held := r.allow(t0.Add(step.at), 10*time.Second)
		if ok != step.ok || held != step.held {
			t.Fatalf("step %d (at +%s): allow = %v, %d held; want %v, %d", i, step.at, ok, held, step.ok, step.held)
		}
	}
}

// syncBuffer is a log the test reads while the server writes it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *syncBuffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *syncBuffer) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// closures counts the connections whose other end closed them.
type closures struct {
	n  atomic.Int32
	ch chan struct{}
}

func (cl *closures) watch(c net.Conn) {
	go func() {
		io.Copy(io.Discard, c)
		cl.n.Add(1)
		cl.ch <- struct{}{}
	}()
}

// wait returns once want connections are closed, or after within, with
// how many are.
func (cl *closures) wait(want int, within time.Duration) int {
	timeout := time.After(within)
	for int(cl.n.Load()) < want {
		select {
		case <-cl.ch:
		case <-timeout:
			return int(cl.n.Load())
		}
	}
	return int(cl.n.Load())
}

// Anyone who reaches the listen address can connect. A hundred strangers
// sending a hello that claims a 64 MiB payload, garbage, or a long text,
// then a hundred saying nothing: the secondary allocates next to nothing
// for them, closes those past maxUnauthenticated in their handshake at
// once, logs a line or two rather than one each, never more than an
// excerpt of what they sent, and the primary connects once they are gone.
func TestSecondaryStrangersBounded(t *testing.T) {
	logs := &syncBuffer{}
	s := newTestSecondaryLog(t, filepath.Join(t.TempDir(), "state"), slog.New(slog.NewTextHandler(logs, nil)))
	huge := wire.AppendFrame(nil, &wire.Frame{Type: wire.TypeHello})
	binary.LittleEndian.PutUint32(huge[16:], wire.MaxPayload)
	long := wire.AppendFrame(nil, &wire.Frame{Type: wire.TypeError, Payload: []byte(strings.Repeat("A", 3000) + "\nforged line")})
	firsts := [][]byte{append(huge, "the rest never comes"...), []byte("GET / HTTP/1.1\r\nHost: duet\r\n\r\n"), long}
	const n = 100
	cl := &closures{ch: make(chan struct{}, 2*n)}
	var conns []net.Conn
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	dial := func(first []byte) {
		c, err := net.Dial("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		c.Write(first) // fails if the server closed it already: as good
		cl.watch(c)
	}

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range n {
		dial(firsts[i%len(firsts)])
	}
	// Well within handshakeTimeout: closed for what they sent.
	if got := cl.wait(n, 5*time.Second); got != n {
		t.Errorf("%d of %d strangers that sent a bad first frame closed within 5s", got, n)
	}
	for range n {
		dial(nil)
	}
	if got := cl.wait(2*n-maxUnauthenticated, 5*time.Second) - n; got < n-maxUnauthenticated {
		t.Errorf("%d of %d silent strangers closed within 5s; want all but the %d in their handshake closed at once", got, n, maxUnauthenticated)
	}
	runtime.ReadMemStats(&after)
	if grew := after.TotalAlloc - before.TotalAlloc; grew > 32<<20 {
		t.Errorf("%d strangers cost the secondary %d MiB of allocations, want less than 32", 2*n, grew>>20)
	}

	for _, c := range conns {
		c.Close() // the silent ones give their places back
	}
	var c net.Conn
	var w wire.Welcome
	for deadline := time.Now().Add(10 * time.Second); ; {
		var err error
		if c, w, err = dialPeer(context.Background(), testLink, &net.Dialer{}, s.addr, wire.Hello{Purpose: wire.PurposeReplicate, Session: 7, Dir: "data"}); err == nil {
			c.SetDeadline(time.Now().Add(5 * time.Second))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the primary cannot connect once the strangers left: %v", err)
		}
		time.Sleep(10 * time.Millisecond) // the primary retries too
	}
	t.Cleanup(func() { c.Close() })
	p := &peerConn{t: t, c: c, br: bufio.NewReader(c), w: w}
	p.batch(1, wire.Op{Code: wire.OpCreate, Path: "after-the-strangers", Mode: 0o644})
	p.ack(1, 0)

	out := logs.String()
	if k := strings.Count(out, "peer handshake failed"); k > 3 {
		t.Errorf("%d log lines for failed handshakes, want a few (one per %s)", k, handshakeLogEvery)
	}
	if i := strings.Index(out, strings.Repeat("A", 101)); i >= 0 {
		t.Errorf("the log holds more than 100 bytes of a stranger's text: %.200q...", out[max(0, i-100):])
	}
}

// What the primary sends fits the limits the secondary enforces.
func TestBatchesFitTheWire(t *testing.T) {
	smallest := len(wire.AppendOp(nil, &wire.Op{Code: wire.OpRemove, Path: "a"}))
	largest := len(wire.AppendOp(nil, &wire.Op{Code: wire.OpWrite, Path: strings.Repeat("d", wire.MaxPath),
		Path2: strings.Repeat("d", wire.MaxPath), Off: 1 << 62, Len: 1 << 62, Mtime: -1 << 63, Atime: -1 << 63,
		Mode: 1<<32 - 1, UID: 1<<32 - 1, GID: 1<<32 - 1, Rdev: 1<<64 - 1, Data: make([]byte, readChunk)}))
	// A batch is sent once it reaches batchRaw: it holds one op more.
	if size := batchRaw - 1 + largest; size > wire.MaxBatch {
		t.Errorf("a batch can take %d bytes, past wire.MaxBatch (%d)", size, wire.MaxBatch)
	}
	if ops := (batchRaw-1)/smallest + 1; ops > wire.MaxBatchOps {
		t.Errorf("a batch can hold %d ops, past wire.MaxBatchOps (%d)", ops, wire.MaxBatchOps)
	}
	smallestEntry := len(wire.AppendEntry(nil, &wire.Entry{Path: "a"}))
	if entries := manifestFrame/smallestEntry + 1; entries > wire.MaxManifestEntries {
		t.Errorf("a manifest frame can hold %d entries, past wire.MaxManifestEntries (%d)", entries, wire.MaxManifestEntries)
	}
}

// A stranger that keeps maxUnauthenticated silent connections open (each
// renewed as handshakeTimeout ends it) must not keep the primary out: it
// would stop replication for as long as it likes, the secondary going
// stale and the pair without a failover.
func TestSecondaryStrangerCannotKeepPrimaryOut(t *testing.T) {
	s := newTestSecondary(t, filepath.Join(t.TempDir(), "state"))
	stranger := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}
	for range 2 * maxUnauthenticated {
		c, err := stranger.Dial("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
	}
	time.Sleep(100 * time.Millisecond) // accepted, or closed at once
	var err error
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(retryBackoff / 5) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		var c net.Conn
		c, _, err = dialPeer(ctx, testLink, &net.Dialer{}, s.addr, wire.Hello{Purpose: wire.PurposeReplicate, Session: 7, Dir: "data"})
		cancel()
		if err == nil {
			c.Close()
			return
		}
	}
	t.Fatalf("the primary could not connect for 2 s while a stranger held %d silent connections: %v", 2*maxUnauthenticated, err)
}

// Strangers with many addresses (a subnet's worth, or IPv6) can take
// every shared handshake place, four from each; the peer's configured
// address keeps places of its own, or replication would stop for as
// long as they renew their connections.
func TestSecondaryStrangersFromManyAddressesLeaveThePeersPlaces(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	if err := os.MkdirAll(data, 0o755); err != nil {
		t.Fatal(err)
	}
	addr := serveTestSecondary(t, &Server{Link: testLink, StateDir: filepath.Join(filepath.Dir(data), "state"), Dirs: []Dir{{Name: "data", Path: data}},
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)), PeerAddrs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}}, data).addr
	cl := &closures{ch: make(chan struct{}, 4*maxUnauthenticated)}
	from := func(b byte) net.Conn {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, b)}}
		c, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		cl.watch(c)
		return c
	}
	// Silent strangers, maxUnauthenticatedFrom from each address, until
	// the shared places are taken.
	strangers := 0
	for b := byte(2); strangers < maxUnauthenticated; b++ {
		for range maxUnauthenticatedFrom {
			from(b)
			strangers++
		}
	}
	if got := cl.wait(1, 300*time.Millisecond); got != 0 {
		t.Fatalf("%d of the first %d strangers closed: each should hold a place", got, maxUnauthenticated)
	}
	// The places are all taken: one more stranger is closed at once.
	from(250)
	if got := cl.wait(1, 5*time.Second); got != 1 {
		t.Fatalf("a stranger past the %d places was not closed at once (%d closed)", maxUnauthenticated, got)
	}
	ctx2, cancel2 := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel2()
	peer := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}}
	c, w, err := dialPeer(ctx2, testLink, &peer, addr, wire.Hello{Purpose: wire.PurposeReplicate, Session: 7, Dir: "data"})
	if err != nil {
		t.Fatalf("the primary, from its configured address, could not connect while strangers held the %d shared places: %v", maxUnauthenticated, err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(5 * time.Second))
	p := &peerConn{t: t, c: c, br: bufio.NewReader(c), w: w}
	p.batch(1, wire.Op{Code: wire.OpCreate, Path: "past-the-strangers", Mode: 0o644})
	p.ack(1, 0)
}
