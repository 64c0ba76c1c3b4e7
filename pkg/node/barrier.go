package node

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/duet-ha/duet/pkg/barrier"
	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/config"
	"github.com/duet-ha/duet/pkg/latency"
	"github.com/duet-ha/duet/pkg/replica"
)

// Durability calls: what the daemon answers a supervisor's barrier
// request (see docs/DESIGN.md §5), and the client side of it.

// eagerHold is how long after the last durability call every capture
// record still wakes the reader at once.
const eagerHold = 2 * time.Second

// defaultBarrierTimeout is Node.barrierTimeout: past it, a durability
// call that the peer did not confirm ends the peer's connection (see
// peerSilent); past twice that, the call fails (EIO) rather than claim
// durability.
const defaultBarrierTimeout = 30 * time.Second

// barrier waits until everything captured so far is on the peer: "ok",
// "alone" (no peer in sync: released, tracked for a resync), or
// "error: ...".
func (n *Node) barrier(ctx context.Context) string {
	if r := n.barrierRefusal(); r != "" {
		return r
	}
	m := n.machine.Load()
	start := time.Now()
	end := n.waiting.begin(start)
	defer func() {
		end()
		n.metrics.barriers.Observe(time.Since(start).Seconds())
		n.stages.Since(latency.Daemon, start)
	}()
	n.lastBarrier.Store(bootNanos())
	n.smu.RLock()
	primaries, c := n.primaries, n.cap
	n.smu.RUnlock()
	if len(primaries) != len(n.cfg.Replicate) {
		// The term's primaries are gone (stopPrimary: the role is being
		// handed over, the capture no longer sees writes) or not there
		// yet, while the state still serves: nothing can confirm the
		// call. Answered "ok", a write made then reached no record and
		// no peer (TestSwapTwice: 4 acknowledged records missing on the
		// new primary).
		return "error: this node is leaving (or not yet in) the primary role: the change is not confirmed on the peer"
	}
	if c != nil && c.Stopped() {
		// Checked here for every directory: an async one's call waits on
		// the lag alone, which knows nothing of writes the stopped
		// reader will never hand over (a sync one's Drain fails too).
		return "error: " + errNoCapture.Error()
	}
	if c != nil && !n.eager.Load() {
		if err := c.SetEagerWake(true); err == nil {
			n.eager.Store(true)
		}
	}
	// A peer that cannot take over (lost, or its copy is stale) does not
	// hold the call: the change stays here, tracked, until it is shipped.
	// One that could take over holds it until the change is on it, or
	// until the cluster learns it cannot (see peerCannotTakeOver).
	streaming := m.State == cluster.Prim
	for _, p := range primaries {
		streaming = streaming && p.Streaming()
	}
	if !streaming && n.tryRelease() {
		return n.alone()
	}
	wctx, cancel := context.WithTimeout(ctx, 2*n.barrierTimeout)
	defer cancel()
	silentAt := start.Add(n.barrierTimeout)
	reply := "ok"
	for i, p := range primaries {
		err := n.waitPeer(wctx, i, p, silentAt)
		switch {
		case errors.Is(err, replica.ErrAlone):
			if reply = n.alone(); reply != "alone" {
				return reply
			}
		case err != nil && wctx.Err() != nil && ctx.Err() == nil:
			return fmt.Sprintf("error: directory %s: the peer confirmed nothing for %s and did not say its copy is stale", p.Dir.Name, 2*n.barrierTimeout)
		case err != nil:
			return "error: " + err.Error()
		}
	}
	return reply
}

// waitPeer waits, for a durability call, until directory i's peer holds
// what the call needs (sync) or lags by at most max_lag (async), or the
// call may go on without it (ErrAlone, see peerCannotTakeOver). Not
// confirmed by silentAt, the peer is taken as silent (peerSilent): from
// then on the call is released as soon as the peer cannot take over,
// even if its connection comes back and streams.
func (n *Node) waitPeer(ctx context.Context, i int, p *replica.Primary, silentAt time.Time) error {
	var unconfirmed atomic.Bool
	t := time.AfterFunc(time.Until(silentAt), func() {
		if n.leaving.Load() {
			// A handover holds its calls until they are shipped, or the
			// peer is silent for cluster.timeout (watchLeaving).
			return
		}
		n.peerSilent(p)
		unconfirmed.Store(true)
		p.Wake()
	})
	defer t.Stop()
	rel := replica.Release{Now: n.tryRelease, Streaming: unconfirmed.Load}
	var err error
	if r := n.cfg.Replicate[i]; r.Mode == config.ModeAsync {
		err = p.WaitLag(ctx, r.MaxLag, rel)
	} else {
		err = p.WaitShipped(ctx, kernel{n}, rel)
	}
	if err == nil {
		n.silent.Delete(p) // the peer confirms again: a new episode may end its connection
	}
	return err
}

// peerSilent is done when a durability call waited barrierTimeout for p's
// peer. Until the peer confirms everything, the heartbeats say it is out
// of sync: it marks its copy stale, says so, and the call is released
// alone (or fails, with cluster.alone_writes: fail) under the usual rule.
// If the peer streams, connected and in sync yet confirming nothing (its
// disk hung, its applier stuck), its connection is ended too, once per
// episode, as the cluster loop does for a deaf peer. Failing the call
// instead, with the peer still an up-to-date SECOND, was unsafe: MariaDB
// may report a commit whose binary log flush got EIO, and the peer's
// takeover would lose it.
func (n *Node) peerSilent(p *replica.Primary) {
	n.relMu.Lock()
	n.aloneGen.Add(1) // a catch-up in progress does not count
	n.releasedAlone.Store(true)
	n.relMu.Unlock()
	if !p.Streaming() {
		return
	}
	if _, again := n.silent.LoadOrStore(p, true); again {
		return
	}
	why := "the peer confirmed nothing for " + n.barrierTimeout.String()
	n.log.Warn(why+": ending the replication connection", "dir", p.Dir.Name, "peer", n.machine.Load().Peer.Name)
	p.Drop(why)
}

// barrierRefusal is why a durability call fails at once, or "".
func (n *Node) barrierRefusal() string {
	if m := n.machine.Load(); !m.State.Serving() {
		return "error: this node is " + m.State.String() + ", not the primary"
	}
	// While the role is handed over a call waits to be shipped (never
	// released as "alone"), unless the peer went silent meanwhile.
	if n.leavingFail.Load() && n.leaving.Load() {
		return "error: the peer went silent while this node handed over the primary role"
	}
	return ""
}

// peerCannotTakeOver reports whether the peer can no longer take over with
// a copy that lacks what this node writes now, so that a durability call
// the peer did not confirm may be released. Either the cluster declared the
// peer lost, this node's heartbeats have announced ALONE since (a peer that
// still hears them marks its copy stale before anything is released) and
// the witness, if any, answered since (this node is not the cut-off one);
// or the peer says its copy is stale (a stopped peer is stale as soon as it
// hears this node serve). While the peer is heard as an up-to-date SECOND,
// a call the data path cannot confirm is held instead: released, the change
// could be lost by a takeover. The heartbeats then say the peer is out of
// sync, it marks its copy stale and says so, and the call is released. A
// peer that streams yet confirms nothing is told so after barrierTimeout
// (peerSilent).
func (n *Node) peerCannotTakeOver() bool {
	m := n.machine.Load()
	if m.State == cluster.Alone {
		// With a witness, only once it answered after the peer was lost:
		// a primary cut off from both would release writes that the
		// peer, taking over, never got (it steps down instead).
		witnessed := n.cfg.Cluster.Witness == "" || n.witnessOK.Load() > n.peerLostAt.Load()
		return n.announcedAlone.Load() == m.Epoch && witnessed
	}
	p := m.Peer
	if !m.State.Serving() && p.StaleHeld && p.Epoch > m.Epoch {
		// This node is leaving the role for the peer's newer copy,
		// which counts as stale only because the role this node held
		// was found held (cluster.Machine.StaleHeld): the peer takes
		// over once it hears this node stepped down, without what this
		// node would release now.
		return false
	}
	return p.Seen && p.Stale && n.staleCurrent(p)
}

// staleCurrent reports whether the peer's "stale" (in heartbeat p) still
// holds: no heartbeat of ours that said "synced" can still make it SECOND.
// A peer turns SECOND on such a heartbeat; one sent just before a call is
// released may still be in flight, or accepted and not yet applied, while
// the peer's last heartbeat says stale. Released then, and this node dead
// within the next interval (whose heartbeat would say "not in sync"), the
// write would be lost by the peer's takeover. So the stale heartbeat must
// echo our last "synced" one, or that one must be too old for the peer to
// accept (its Guard refuses heartbeats older than cluster.timeout; twice
// that leaves room for the clocks' drift).
func (n *Node) staleCurrent(p cluster.Peer) bool {
	sent := time.Duration(n.syncedSent.Load())
	if sent == 0 {
		return true
	}
	if p.EchoBoot == n.guard.Boot() && p.EchoTime >= sent {
		return true
	}
	left := 2*n.cfg.Cluster.Timeout - (hbClock() - sent)
	if left < 0 {
		return true
	}
	// Nothing else may happen by then to look again.
	if n.expiryWake.CompareAndSwap(false, true) {
		time.AfterFunc(left+time.Millisecond, func() {
			n.expiryWake.Store(false)
			n.wakePrimaries()
		})
	}
	return false
}

// tryRelease is Release.Now: whether a durability call may go on without
// the peer (peerCannotTakeOver). A release is recorded in the same step,
// under relMu, so that the heartbeats cannot say "synced" after a check
// that relied on none being sent (see heartbeat).
func (n *Node) tryRelease() bool {
	n.relMu.Lock()
	defer n.relMu.Unlock()
	if n.leaving.Load() {
		if n.leavingFail.Load() {
			return true // fails: the peer went silent (watchLeaving)
		}
		if !n.leavingAlone.Load() {
			// Handing the role over to a peer that can take it: never
			// released alone (the peer would take over without it).
			return false
		}
	}
	if !n.peerCannotTakeOver() {
		return false
	}
	n.aloneGen.Add(1)
	n.releasedAlone.Store(true)
	return true
}

// wakePrimaries has every waiting durability call look again at what the
// cluster knows of the peer.
func (n *Node) wakePrimaries() {
	n.smu.RLock()
	defer n.smu.RUnlock()
	for _, p := range n.primaries {
		p.Wake()
	}
}

// alone answers a durability call that no peer in sync can confirm:
// released and tracked for a resync, or refused (cluster.alone_writes).
func (n *Node) alone() string {
	if n.leaving.Load() && (n.leavingFail.Load() || !n.leavingAlone.Load()) {
		// The peer is taking over: released, the change would be lost.
		return "error: the primary role was handed over before this change was shipped"
	}
	if n.cfg.Cluster.AloneWrites == config.AloneFail {
		return "error: no peer in sync, and cluster.alone_writes is fail"
	}
	return "alone"
}

// BarrierClient asks the daemon behind Socket to wait until every change
// is on the peer. It keeps idle connections for the next calls; safe for
// concurrent use (each call in progress holds a connection of its own).
type BarrierClient struct {
	Socket string
	idle   chan *barrierConn

	mu      sync.Mutex
	reports []string // timings of answered calls, for the next requests
}

type barrierConn struct {
	c   net.Conn
	br  *bufio.Reader
	rtt time.Duration // of the last call on this connection
}

// Report hands the timing of an answered durability call to the daemon
// with a later request, for `duet status --latency`.
func (b *BarrierClient) Report(t barrier.Timing) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.reports) < 64 { // a burst beyond is not worth holding
		b.reports = append(b.reports, fmt.Sprintf("held=%d local=%d", t.Held, t.Local))
	}
}

// request is the next request line: "barrier", with this connection's
// last round trip and one pending report.
func (b *BarrierClient) request(bc *barrierConn) string {
	req := "barrier"
	if bc.rtt > 0 {
		req += fmt.Sprintf(" rtt=%d", bc.rtt)
	}
	b.mu.Lock()
	if len(b.reports) > 0 {
		req += " " + b.reports[0]
		b.reports = b.reports[1:]
	}
	b.mu.Unlock()
	return req
}

// NewBarrierClient returns a client of the daemon behind socket.
func NewBarrierClient(socket string) *BarrierClient {
	return &BarrierClient{Socket: socket, idle: make(chan *barrierConn, 16)}
}

// Wait returns nil once the changes made so far are durable on the peer,
// or were released because no peer is in sync (alone).
func (b *BarrierClient) Wait() error {
	var bc *barrierConn
	select {
	case bc = <-b.idle:
	default:
	}
	if bc != nil {
		line, err := bc.call(b.request(bc))
		if err == nil {
			return b.done(bc, line)
		}
		bc.c.Close() // the daemon restarted since: try a new connection
	}
	c, err := net.DialTimeout("unix", b.Socket, 2*time.Second)
	if err != nil {
		return noDaemon(b.Socket, err)
	}
	bc = &barrierConn{c: c, br: bufio.NewReader(c)}
	line, err := bc.call(b.request(bc))
	if err != nil {
		c.Close()
		return fmt.Errorf("barrier: daemon gone: %w", err)
	}
	return b.done(bc, line)
}

func (bc *barrierConn) call(req string) (string, error) {
	start := time.Now()
	if _, err := bc.c.Write([]byte(req + "\n")); err != nil {
		return "", err
	}
	line, err := bc.br.ReadString('\n')
	bc.rtt = time.Since(start)
	return strings.TrimSpace(line), err
}

func (b *BarrierClient) done(bc *barrierConn, line string) error {
	select {
	case b.idle <- bc:
	default:
		bc.c.Close()
	}
	switch line {
	case "ok", "alone":
		return nil
	}
	return errors.New(line)
}
