package node

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/config"
	"github.com/duet-ha/duet/pkg/replica"
	"github.com/duet-ha/duet/pkg/stack"
	"github.com/duet-ha/duet/pkg/vip"
	"golang.org/x/sys/unix"
)

// command is an operator request for the cluster loop.
type command struct {
	ev    cluster.Event
	reply chan string
}

// failbackCandidate says whether m, serving, may hand the role back to
// its peer, the preferred node pref (cluster.prefer), once the peer's
// copy is a mirror: the peer is SECOND at m's epoch. Not a peer that gave
// the role up because a service failed there and has not served since
// (cluster.Machine.ServiceFailed): the service would fail there again,
// and the role come back, at every failback_delay; `duet swap` moves it
// once the operator mended the service.
func failbackCandidate(m cluster.Machine, pref string) bool {
	p := m.Peer
	return pref != "" && m.State == cluster.Prim && p.Name == pref && p.Seen && p.State == cluster.Second && p.Epoch == m.Epoch && !p.ServiceFailed
}

// clusterEpoch is the machine's epoch, which this node's primaries send
// in their hellos (replica.Primary.Epoch).
func (n *Node) clusterEpoch() uint64 {
	if m := n.machine.Load(); m != nil {
		return m.Epoch
	}
	return 0
}

// admitPrimary is the replica server's Admit: a stream from a primary
// whose epoch is older than this copy's is refused while this node does
// not count its copy stale (or stale only because its check found the
// role held: cluster.Machine.StaleHeld). Such a primary serves on in a
// term this node knew, older than the one this node served since (its
// host stalled while this one took over: it steps down on hearing this
// copy, cluster.Machine.Shared), or serves a term of its own takeover
// that this node has yet to hear of (this node counts its copy stale on
// its first heartbeat, and the primary's next attempt is taken). Either
// way its resync would replace what this copy's newer term acknowledged
// before the heartbeats settle which copy is the reference. A hello
// without an epoch (a sender of an older version) is taken, as before.
func (n *Node) admitPrimary(epoch uint64) string {
	m := n.machine.Load()
	if m == nil || epoch == 0 || epoch >= m.Epoch || m.Stale && !m.StaleHeld || m.State.Serving() {
		return ""
	}
	return fmt.Sprintf("this copy (epoch %d) is newer than the sender's (epoch %d) and not stale: it takes no stream from it until the heartbeats settle which copy is the reference", m.Epoch, epoch)
}

// persisted is the machine's part that survives a restart.
type persisted struct {
	State string `json:"state"`
	Epoch uint64 `json:"epoch"`
	Stale bool   `json:"stale"`
	// HandedOver: this node gave the role away and has not heard the
	// peer serve since (cluster.Machine.HandedOver). A daemon stopped
	// by the handover, or killed, must not come back as the reference.
	HandedOver bool `json:"handed_over,omitempty"`
	// StaleHeld: stale only because a check found the role held
	// elsewhere (cluster.Machine.StaleHeld).
	StaleHeld bool `json:"stale_held,omitempty"`
}

func (n *Node) statePath() string { return filepath.Join(n.cfg.StateDir, "cluster.json") }

// staleMarkPath is where persist moves cluster.json when it cannot save a
// state whose copy is stale (see markStale).
func (n *Node) staleMarkPath() string { return filepath.Join(n.cfg.StateDir, "cluster.stale.json") }

// loadMachine restores epoch and staleness. A node that last served holds
// the reference copy; one that was SECOND may have missed what its peer
// wrote since; a fresh pair trusts the configured primary.
func (n *Node) loadMachine() (cluster.Machine, error) {
	m := cluster.Machine{Name: n.cfg.Node, ID: n.cfg.EpochID(), State: cluster.Wait, Preferred: n.cfg.Role == config.RolePrimary}
	path := n.statePath()
	b, err := os.ReadFile(path)
	marked := false
	if errors.Is(err, os.ErrNotExist) {
		// A stale state whose save failed (markStale): the last state
		// saved, if any, under another name that says the copy is stale.
		path = n.staleMarkPath()
		if b, err = os.ReadFile(path); err == nil {
			marked = true
		}
	}
	if errors.Is(err, os.ErrNotExist) {
		m.Stale = !m.Preferred
		return m, nil
	}
	if err != nil {
		return m, fmt.Errorf("cluster state: %w", err)
	}
	var p persisted
	if marked {
		// Stale whatever it holds: empty (there was no state), or even
		// damaged (epoch 0 then); "move it away" would make a fresh,
		// perhaps preferred, node of it.
		json.Unmarshal(b, &p)
		m.Epoch, m.Stale = p.Epoch, true
		return m, nil
	}
	if err := json.Unmarshal(b, &p); err != nil {
		return m, fmt.Errorf("cluster state %s: %w (move it away to start as a fresh node)", path, err)
	}
	m.Epoch, m.Stale, m.HandedOver = p.Epoch, p.Stale, p.HandedOver
	switch p.State {
	case "PRIM", "ALONE":
		m.Stale = false
	case "SECOND":
		m.Stale = true
	default:
		m.StaleHeld = p.Stale && p.StaleHeld
	}
	return m, nil
}

// persist saves the machine's lasting part in cluster.json. When that
// fails for a state whose copy is stale, the copy is marked stale another
// way (markStale), which needs no data block: a restart must not take the
// last state saved (PRIM, say) for the truth and serve an older copy.
func (n *Node) persist(m cluster.Machine) error {
	b, _ := json.Marshal(persisted{State: m.State.String(), Epoch: m.Epoch, Stale: m.Stale, HandedOver: m.HandedOver, StaleHeld: m.Stale && m.StaleHeld})
	if err := writeDurable(n.statePath(), b); err != nil {
		err = fmt.Errorf("saving cluster state: %w", err)
		if m.Stale || m.State == cluster.Second {
			if merr := n.markStale(); merr != nil {
				// Hidden only if a restart would not know it: a disk
				// that says SECOND, stale, or holds a mark (a state
				// directory gone read-only keeps them) already does,
				// and hiding it would hold every call on the primary.
				if r, lerr := n.loadMachine(); lerr == nil && !r.Stale {
					n.staleUnsaved.Store(true)
					return fmt.Errorf("%w; marking the copy stale failed too (%v): the heartbeats do not say stale until it is saved", err, merr)
				}
				n.staleUnsaved.Store(false)
				return fmt.Errorf("%w; marking the copy stale failed too (%v), but the state on disk already says stale", err, merr)
			}
			n.staleUnsaved.Store(false)
			return fmt.Errorf("%w; the copy is marked stale (%s) for a restart", err, n.staleMarkPath())
		}
		return err
	}
	n.staleUnsaved.Store(false)
	n.markSaved(m)
	// Saved: a mark left by an earlier failure is older than this state.
	if err := os.Remove(n.staleMarkPath()); err == nil {
		syncDir(n.cfg.StateDir)
	}
	return nil
}

// markStale renames cluster.json to cluster.stale.json (an empty file
// when there is none), which loadMachine reads as "this copy is stale"
// with the epoch last saved. A rename within a directory, or an empty
// file, needs no data block: it works on a full disk, where a new
// cluster.json could not be written.
func (n *Node) markStale() error {
	err := os.Rename(n.statePath(), n.staleMarkPath())
	if errors.Is(err, os.ErrNotExist) {
		var f *os.File
		if f, err = os.OpenFile(n.staleMarkPath(), os.O_WRONLY|os.O_CREATE, 0o644); err == nil {
			err = f.Close()
		}
	}
	if err != nil {
		return err
	}
	return syncDir(n.cfg.StateDir)
}

// writeDurable replaces the file at path with b so that a crash leaves
// either the old content or the new: a temporary file, fsynced, renamed
// over path, then the directory fsynced so that the rename survives a
// power loss too.
func writeDurable(path string, b []byte) error {
	tmp := path + ".tmp"
	f, err := os.Create(tmp)
	if err == nil {
		_, err = f.Write(b)
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = syncDir(filepath.Dir(path))
	}
	if err != nil {
		return fmt.Errorf("%s: %w (is state_dir writable, with free space?)", path, err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// carryOut carries out the actions of the step from prev to next, in
// order: DoPersist itself, the others through do. It returns the machine
// the node is in afterwards. When the step would start serving and its
// state cannot be saved, the rest is not carried out and the node stays
// prev, its checks free to run again: serving with an epoch the disk does
// not hold, the node could draw that epoch again after a restart. Other
// steps (leaving the role above all) go on; the error is logged.
//
// A handover it cannot take is refused: the node, SECOND, counts its copy
// as stale from then on (in memory: its disk cannot say so), and stepSecond
// moves it to WAIT at the next heartbeat. Its peer, the giver, hears a
// stale WAIT that never served and serves again: its copy is the
// reference. Kept SECOND and retrying, the node left both waiting and
// nothing serving until its disk was repaired
// (TestSwapReceiverCannotSaveNothingServes).
func (n *Node) carryOut(prev, next cluster.Machine, acts []cluster.Action, do func(cluster.Action)) (cluster.Machine, error) {
	for _, a := range acts {
		if a.Do != cluster.DoPersist {
			do(a)
			continue
		}
		err := n.persist(next)
		switch {
		case err == nil:
		case next.State.Serving() && !prev.State.Serving():
			prev.Checking = false
			if prev.State == cluster.Second && next.Peer.Handover && !next.Peer.State.Serving() {
				prev.Stale = true
				// Said on disk if it can be: a save that failed at the
				// directory's fsync, after its rename, may have left
				// the refused PRIM there, which a restart would load
				// (a review). persist falls back to the stale mark.
				if serr := n.persist(prev); serr != nil {
					n.log.Warn("refusing a handover: the copy's stale state not saved either", "err", serr)
				}
				return prev, fmt.Errorf("refusing the handover from %s, whose copy stays the reference: not becoming %s (epoch %d): %w", next.Peer.Label(), next.State, next.Epoch, err)
			}
			return prev, fmt.Errorf("not becoming %s (epoch %d): %w", next.State, next.Epoch, err)
		default:
			n.log.Error("cluster state not saved", "state", next.State.String(), "epoch", next.Epoch, "err", err)
		}
	}
	return next, nil
}

// heartbeatConns binds one UDP socket per heartbeat network.
func (n *Node) heartbeatConns() ([]*net.UDPConn, []*net.UDPAddr, error) {
	var conns []*net.UDPConn
	var peers []*net.UDPAddr
	port := strconv.Itoa(n.cfg.Cluster.HeartbeatPort)
	for i, nw := range n.cfg.Cluster.Networks {
		la, err := net.ResolveUDPAddr("udp4", net.JoinHostPort(nw.Local, port))
		if err == nil {
			var pa *net.UDPAddr
			pa, err = net.ResolveUDPAddr("udp4", net.JoinHostPort(nw.Peer, port))
			peers = append(peers, pa)
		}
		var c *net.UDPConn
		if err == nil {
			c, err = net.ListenUDP("udp4", la)
		}
		if err != nil {
			for _, c := range conns {
				c.Close()
			}
			return nil, nil, fmt.Errorf("cluster.networks[%d] local %s: %w (is the address configured on this host, and the port free?)", i, nw.Local, err)
		}
		conns = append(conns, c)
	}
	return conns, peers, nil
}

// sendHeartbeats tells the peer our state every interval on every network.
func (n *Node) sendHeartbeats(ctx context.Context, conns []*net.UDPConn, peers []*net.UDPAddr) {
	t := time.NewTicker(n.cfg.Cluster.Interval)
	defer t.Stop()
	for {
		h := n.heartbeat()
		pkt := h.Marshal(n.heartbeatKey())
		for i, c := range conns {
			c.WriteToUDP(pkt, peers[i])
		}
		if m := n.machine.Load(); h.State == cluster.Alone && m.State == cluster.Alone && m.Epoch == h.Epoch && n.announcedAlone.Load() != m.Epoch {
			// A peer that hears this marks its copy stale: durability
			// calls held for it may go on now.
			n.announcedAlone.Store(m.Epoch)
			n.wakePrimaries()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-n.hbKick:
		}
	}
}

// kickHeartbeat has the sender send a heartbeat now rather than at its
// next tick.
func (n *Node) kickHeartbeat() {
	select {
	case n.hbKick <- struct{}{}:
	default:
	}
}

// peerDeaf reports whether the peer, heard in heartbeat p, says its copy
// is stale and has applied no heartbeat of ours for longer than
// cluster.timeout: what this node sends it is lost on the way.
func (n *Node) peerDeaf(p cluster.Peer) bool {
	if !p.Seen || !p.Stale {
		return false
	}
	return p.EchoBoot != n.guard.Boot() || hbClock()-p.EchoTime > n.cfg.Cluster.Timeout
}

// peerRetired reports whether the peer's run boot was replaced by a
// newer one (Guard.Retired).
func (n *Node) peerRetired(boot uint64) bool {
	n.hbMu.Lock()
	defer n.hbMu.Unlock()
	return n.guard.Retired(boot)
}

// peerApplied has the heartbeats echo the peer's heartbeat p once the
// machine has applied it.
func (n *Node) peerApplied(p cluster.Peer) {
	beat := cluster.Heartbeat{Boot: p.Boot, Time: p.Time}
	n.hbMu.Lock()
	n.guard.Applied(&beat)
	n.hbMu.Unlock()
}

// heartbeat makes the next heartbeat to send. It is stamped before the
// state is read: the echo it carries names a heartbeat of the peer whose
// state the machine read here has applied (see Guard.Applied).
func (n *Node) heartbeat() cluster.Heartbeat {
	var h cluster.Heartbeat
	n.hbMu.Lock()
	n.guard.Stamp(&h, hbClock())
	n.hbMu.Unlock()
	// The state is read once, and read again if the machine moved on
	// before the decision under relMu (below): a heartbeat that read
	// PRIM before a leave and decided after it (the term's primaries
	// gone, leaving cleared) said "PRIM, not synced", which turned the
	// receiver stale and undid the swap after it had answered ok
	// (TestLeaveEndHeartbeatUndoesSwap, TestLeaveWholeWithinHeartbeatUndoesSwap,
	// from two reviews).
	var primaries []*replica.Primary
	var streaming, released bool
	for try := 0; ; try++ {
		m := n.machine.Load()
		h.Name, h.State, h.Epoch, h.Stale, h.Preferred, h.Handover = m.Name, m.State, m.Epoch, m.Stale, m.Preferred, m.HandedOver
		h.Shared = m.Shared && m.State.Serving()
		h.StaleHeld = h.Stale && m.StaleHeld
		h.ServiceFailed = m.ServiceFailed
		h.Yields = true
		if h.Stale && n.staleUnsaved.Load() {
			// Said only once a restart would know it too: the primary
			// releases its held calls on this node's "stale".
			h.Stale = false
		}
		// Asked before relMu, and smu not taken under it: Streaming takes a
		// Primary's lock, under which a waiting durability call takes relMu
		// (tryRelease), and smu's holders may wait for that lock too.
		primaries = n.servingPrimaries()
		streaming = m.State.Serving() && streams(primaries)
		// "synced" turns the peer SECOND, able to take over: said by a PRIM
		// only with the mark of its term on disk (startwait.go), decided
		// under markMu (a PRIM's only: other states' heartbeats do not wait
		// behind a save's directory fsync) so that a save removing the mark
		// (markSaved) comes wholly before or after it. Not to a stopped
		// peer, which ignores it: its "stale" is then soon current, and a
		// stop of this node removes the mark (TestStoppedPeerNotToldSynced).
		prim := m.State == cluster.Prim
		if prim {
			n.markMu.Lock()
		}
		marked := !prim || !(m.Peer.Seen && m.Peer.State == cluster.Stop) && n.markPeerSyncedLocked(m.Epoch)
		markedTerm := !prim || n.markOn && n.markEpoch == m.Epoch
		n.relMu.Lock()
		// leaving before the machine's second read: a leave sets it
		// under relMu (beginLeaving), before it stops the primaries, and
		// ends by publishing its last state, then clearing it. Read so,
		// not leaving with the machine unchanged means no leave began
		// before relMu, or it has not published yet and is still on.
		leaving := n.leaving.Load()
		if n.machine.Load() != m && try < 3 {
			n.relMu.Unlock()
			if prim {
				n.markMu.Unlock()
			}
			continue
		}
		// While the node leaves the role its replication winds down: the
		// peer must not read that as "out of sync" before the handover. But
		// a call released without the peer meanwhile (a leave no peer can
		// take over from) is one the peer lacks: "synced" then would turn a
		// peer started meanwhile SECOND, able to take over without it
		// (TestLeavingAloneHeartbeatsStopSayingSynced).
		// And only with the mark of this term: a save that began the leave
		// may have removed it (a stop whose peer said stale).
		h.Synced = n.lastSynced.Load() && !n.releasedAlone.Load() && markedTerm
		released = false
		if !leaving {
			released = n.releasedAlone.Load()
			h.Synced = streaming && !released && marked
			n.lastSynced.Store(h.Synced)
		}
		if h.Synced {
			// Until the peer echoes this heartbeat (or it is too old to be
			// accepted), a "stale" heard from the peer may be out of date:
			// this heartbeat can still turn it SECOND.
			n.syncedSent.Store(int64(h.Time))
		}
		n.relMu.Unlock()
		if prim {
			n.markMu.Unlock()
		}
		break
	}
	if streaming && released {
		n.catchUp(primaries)
	}
	return h
}

// newGuard draws this run's heartbeat boot id: random, so that nothing
// recorded from an earlier run echoes it, and not 0 (no echo).
func newGuard(cfg *config.Config) (*cluster.Guard, error) {
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC_RAW, new(unix.Timespec)); err != nil {
		return nil, fmt.Errorf("heartbeat clock CLOCK_MONOTONIC_RAW: %w (duet needs Linux 2.6.28 or later)", err)
	}
	var b [8]byte
	rand.Read(b[:])
	return cluster.NewGuard(binary.LittleEndian.Uint64(b[:])|1, cfg.Cluster.Timeout), nil
}

// hbClock is the heartbeats' clock: raw monotonic, not slewed by NTP, so
// that the two nodes' clocks run at rates within cluster.MaxClockDrift of
// each other (newGuard checked that it can be read).
func hbClock() time.Duration {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC_RAW, &ts)
	return time.Duration(ts.Nano())
}

// heartbeatKey is the key heartbeats are sent with: the one the peer's
// last heartbeat was made with, the current key until one is heard. Amid
// a key rotation (see docs/SECURITY.md) a node that holds both keys
// speaks to its peer in the key the peer has: each hears the other
// throughout.
func (n *Node) heartbeatKey() []byte {
	return n.keys[n.peerKey.Load()]
}

// parseHeartbeat checks a heartbeat with each of the keys; it returns
// the index of the one it was made with.
func (n *Node) parseHeartbeat(b []byte) (h cluster.Heartbeat, key int, err error) {
	for i, k := range n.keys {
		if h, err = cluster.ParseHeartbeat(b, k); err == nil {
			return h, i, nil
		}
	}
	return h, 0, err
}

// receiveHeartbeats reads one network's heartbeats into the loop.
func (n *Node) receiveHeartbeats(ctx context.Context, c *net.UDPConn, peer *net.UDPAddr) {
	buf := make([]byte, cluster.MaxHeartbeat+64)
	var lastWarn, lastAnswer, lastOwnName time.Time
	for ctx.Err() == nil {
		sz, from, err := c.ReadFromUDP(buf)
		if err != nil {
			return
		}
		h, key, err := n.parseHeartbeat(buf[:sz])
		if err != nil || !from.IP.Equal(peer.IP) {
			if err == nil {
				err = fmt.Errorf("heartbeat from %s, expected the peer %s", from.IP, peer.IP)
			}
			n.badHeartbeats.Add(1)
			if time.Since(lastWarn) > 30*time.Second {
				n.log.Warn("heartbeat refused", "from", from.String(), "err", err)
				lastWarn = time.Now()
			}
			continue
		}
		if h.Name == n.cfg.Node {
			// Said once in 30 s: one of this node's own heartbeats sent
			// back from the peer's address (no key needed) made a line
			// each (a review).
			n.badHeartbeats.Add(1)
			if time.Since(lastOwnName) > 30*time.Second {
				n.log.Error("heartbeat carries this node's own name: both nodes are configured with the same node name, or the network sends this node's heartbeats back", "from", from.String())
				lastOwnName = time.Now()
			}
			continue
		}
		n.hbMu.Lock()
		peerBefore := n.guard.Peer()
		fresh := n.guard.Accept(&h, hbClock())
		answer := n.guard.Unanswered(&h, fresh, peerBefore)
		// Which key the peer has now: as with the guard's echo, any
		// heartbeat says it until one is accepted (the peer cannot
		// prove its age before it heard us), then only accepted ones (a
		// replayed one must not make this node speak a key the peer
		// dropped).
		if fresh || !n.hbAccepted {
			n.peerKey.Store(int32(key))
		}
		n.hbAccepted = n.hbAccepted || fresh
		n.hbMu.Unlock()
		// A peer that restarted, or that we just heard from a new run,
		// is answered at once rather than at the next tick: it accepts
		// only heartbeats echoing its run, and a restarted node must hear
		// its peer well within cluster.timeout (6 intervals by default)
		// or it may take the peer for dead. At most twice an interval, so
		// that replayed packets cannot make this node send faster.
		if answer && time.Since(lastAnswer) >= n.cfg.Cluster.Interval/2 {
			lastAnswer = time.Now()
			select {
			case n.hbKick <- struct{}{}:
			default:
			}
		}
		if !fresh {
			continue
		}
		n.heartbeats.Add(1)
		n.lastHeartbeat.Store(bootNanos())
		// Never waits for the loop: while it hands the role over
		// (unserve) it reads no events, and a receiver blocked here
		// would read no heartbeats either: lastHeartbeat would stand
		// still, and watchLeaving would take the live peer for a silent
		// one and kill the services. Dropped, this state comes again
		// with the next heartbeat; those queued are older.
		select {
		case n.events <- cluster.Event{Kind: cluster.EvPeer, Peer: h.Peer()}:
		default:
		}
	}
}

// runCluster runs the cluster loop until ctx ends and the node let go of
// the role, and the heartbeats, both ways, until after that: a node that
// hands the role over as the daemon stops hears its peer throughout (see
// watchLeaving), and the peer hears the handover. It closes conns.
func (n *Node) runCluster(ctx context.Context, m cluster.Machine, conns []*net.UDPConn, peers []*net.UDPAddr) {
	hctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(len(conns) + 1)
	for i, c := range conns {
		go func() {
			defer wg.Done()
			n.receiveHeartbeats(hctx, c, peers[i])
		}()
	}
	go func() {
		defer wg.Done()
		n.sendHeartbeats(hctx, conns, peers)
	}()
	n.loop(ctx, m)
	if m := n.machine.Load(); m.HandedOver || n.saidStop.Load() {
		time.Sleep(3 * n.cfg.Cluster.Interval) // the handover (or stop) heartbeats go out
	}
	cancel()
	for _, c := range conns {
		c.Close() // ends the receivers' reads
	}
	wg.Wait()
}

// loop owns the machine: it applies events and commands and carries out
// the actions.
func (n *Node) loop(ctx context.Context, m cluster.Machine) {
	start := time.Now()
	t := time.NewTicker(n.loopTick())
	defer t.Stop()
	timeout := n.cfg.Cluster.Timeout
	var lastCheckMsg string
	isolation := make(chan struct{}, 1)
	if n.cfg.Cluster.Witness != "" {
		go n.watchWitness(ctx, isolation)
	}
	var mirrorSince time.Time // the preferred peer has been a mirror since
	deafDropped := false      // the connection was ended since the peer went deaf (peerDeaf)
	// actx is what actions run under; a stopping daemon swaps in one
	// that lets it hand its role over.
	actx := ctx
	var lastSaveErr string
	var apply func(ev cluster.Event) string
	apply = func(ev cluster.Event) string {
		m.Resyncing = resyncing(n.dirs, n.metas)
		if ev.Kind == cluster.EvPeer && peerEndsStartWait(ev.Peer, m.Epoch) {
			n.peerHeard.Store(true)
		}
		if ev.Kind == cluster.EvCmdStart {
			// A wait armed at a stop counts from the start.
			n.started.Store(bootNanos())
		}
		prev := m
		next, acts := cluster.Step(m, ev)
		reply := ""
		var serveErr error
		do := func(a cluster.Action) {
			switch a.Do {
			case cluster.DoLog:
				if ev.Kind == cluster.EvChecked && !ev.OK {
					if a.Msg == lastCheckMsg {
						return
					}
					lastCheckMsg = a.Msg
				}
				n.log.Info(a.Msg, "state", next.State.String(), "epoch", next.Epoch)
			case cluster.DoRefuse:
				reply = "refused: " + a.Msg
			case cluster.DoCheck:
				grace := a.Grace
				if grace {
					n.log.Info("peer lost while it was SECOND: the takeover checks wait "+timeout.String()+", when the peer, had it taken over, holds the VIP",
						"peer", next.Peer.Name)
				}
				go func() {
					if grace {
						select {
						case <-time.After(timeout):
						case <-ctx.Done():
							return
						}
					}
					ok, why, held := n.takeoverChecks(ctx)
					n.post(ctx, cluster.Event{Kind: cluster.EvChecked, OK: ok, Why: why, Held: held})
				}()
			case cluster.DoServe:
				// Shown at once: status and heartbeats say PRIM/ALONE
				// while the VIP and the services come up, and a peer
				// deciding on what this node says does not take it for
				// one that does not serve. A handover's receiver says
				// it once the VIP and the capture are taken, before the
				// services start (Unpublished): a term that cannot take
				// the role goes back to the state it had (EvServeFailed,
				// below), which the giver must not have heard serve (it
				// counts its copy stale on that, and would never serve
				// again). (Leaving is published only when done: the
				// peer must not take over before this node let go.)
				publish := func() { n.machine.Store(&next) }
				if !a.Unpublished {
					publish()
					publish = func() {}
				}
				serveErr = n.serve(actx, publish)
				if serveErr != nil {
					n.log.Error("cannot take the primary role", "err", serveErr)
				}
			case cluster.DoUnserve:
				n.unserve(actx, next.Stale)
			}
		}
		var err error
		m, err = n.carryOut(prev, next, acts, do)
		if serveErr != nil && err == nil {
			// At once, before anything else is heard or published: a
			// handover's failed term is undone in this step only.
			apply(cluster.Event{Kind: cluster.EvServeFailed, Why: serveErr.Error()})
			return "error: cannot take the primary role: " + serveErr.Error()
		}
		switch {
		case err != nil:
			// Tried again at the next heartbeat or check: said once.
			if err.Error() != lastSaveErr {
				n.log.Error("cannot take the primary role", "err", err)
			}
			lastSaveErr = err.Error()
			reply = "error: " + err.Error()
		case m.State.Serving():
			lastSaveErr = ""
		}
		// A copy: the loop goes on writing m, while the heartbeats,
		// barriers and status read what is published.
		published := m
		if ev.Kind == cluster.EvPeerLost {
			// Before the new state is published: a witness answer
			// from before the loss must not count as after it for
			// a heartbeat that announces ALONE meanwhile.
			n.peerLostAt.Store(bootNanos())
		}
		n.machine.Store(&published)
		n.leaving.Store(false)
		if ev.Kind == cluster.EvPeerLost && prev.State.Serving() {
			// The data connections would look alive for minutes after a
			// crash without a FIN, holding durability calls.
			n.smu.RLock()
			for _, p := range n.primaries {
				p.Drop("the cluster declared the peer lost (no heartbeats)")
			}
			n.smu.RUnlock()
		}
		// A stale peer's newer echo may let a held call go (staleCurrent).
		echoed := m.Peer.Stale && m.Peer.EchoTime != prev.Peer.EchoTime
		if m.State != prev.State || m.Peer.Seen != prev.Peer.Seen || m.Peer.State != prev.Peer.State || m.Peer.Stale != prev.Peer.Stale || echoed {
			if m.State != prev.State {
				// Announced now, not at the next tick (a heartbeat sent
				// now says what the next would): calls held for a lost
				// peer are released once ALONE is sent, and a primary
				// counts its peer in sync once it hears SECOND (a
				// restart of both nodes waited up to an interval for
				// it, issue 18).
				n.kickHeartbeat()
			}
			n.wakePrimaries()
		}
		// This node serves and the peer it had is gone (it took over
		// from a lost primary, or its secondary was lost): peer_lost
		// once the peer is confirmed down. A takeover's checks ran the
		// fencing command, if one is configured, and it succeeded.
		tookOver := ev.Kind == cluster.EvChecked && prev.State == cluster.Second && m.State.Serving()
		lostSecond := ev.Kind == cluster.EvPeerLost && prev.State.Serving() && prev.Peer.Seen && m.State.Serving()
		if (tookOver || lostSecond) && prev.Peer.Name != "" {
			since := time.Now()
			if t := n.lastHeartbeat.Load(); t != 0 {
				since = time.Now().Add(-bootSince(t))
			}
			n.hooks.lost(prev.Peer.Name, since, tookOver && n.cfg.Cluster.Fence != "")
		}
		if reply == "" {
			reply = "ok: " + m.State.String()
		}
		return reply
	}
	for {
		select {
		case <-ctx.Done():
			p := m.Peer
			// Only to a peer heard from just now: one that died a moment
			// ago would leave both copies marked as possibly stale.
			fresh := bootSince(n.lastHeartbeat.Load()) < 2*n.cfg.Cluster.Interval
			if m.State == cluster.Prim && fresh && p.Seen && p.State == cluster.Second && p.Epoch == m.Epoch {
				// A planned stop (systemctl stop, a reboot): hand the
				// role over as `duet swap` does, so that the peer takes
				// over now instead of after the fault-detection timeout.
				n.log.Info("daemon stopping: handing the primary role over to " + p.Name)
				actx = context.Background()
				apply(cluster.Event{Kind: cluster.EvCmdSwap})
				if !m.State.Serving() {
					return // Run lets the handover heartbeats go out
				}
				// Refused: leave the role the plain way below.
			}
			if m.State == cluster.Alone {
				n.leftAlone()
			}
			if m.State.Serving() {
				n.log.Info("daemon stopping: leaving the primary role")
				n.unserve(context.Background(), false)
				return
			}
			if m.State == cluster.Second || m.State == cluster.Wait {
				// Said to the peer (STOP, stale if it serves, saved
				// first) before the heartbeats end: it then knows this
				// copy cannot take over, and does not wait for it after
				// a restart alone (startwait.go; without it, `stop the
				// secondary, stop the primary, start the primary` left
				// the primary waiting: TestResyncResumesAfterCrash).
				n.log.Info("daemon stopping: telling the peer this node stops")
				apply(cluster.Event{Kind: cluster.EvCmdStop})
				n.saidStop.Store(true)
				n.kickHeartbeat()
			}
			return
		case ev := <-n.events:
			if ev.Kind == cluster.EvPeer && (m.Peer.Seen && ev.Peer.Boot == m.Peer.Boot && ev.Peer.Seq <= m.Peer.Seq || n.peerRetired(ev.Peer.Boot)) {
				// Accepted in order, but posted by the networks'
				// receivers in another: an older state (or a
				// restarted peer's earlier run) must not override a
				// newer one.
				continue
			}
			apply(ev)
			if ev.Kind == cluster.EvPeer {
				n.peerApplied(ev.Peer)
			}
		case c := <-n.cmds:
			c.reply <- apply(c.ev)
		case <-isolation:
			apply(cluster.Event{Kind: cluster.EvIsolated})
		case <-t.C:
			if n.staleUnsaved.Load() {
				if n.persist(m); !n.staleUnsaved.Load() {
					n.log.Info("cluster state saved (or the copy marked stale) at last", "state", m.State.String(), "epoch", m.Epoch, "stale", m.Stale)
					n.kickHeartbeat()
				}
			}
			last := n.lastHeartbeat.Load()
			silence := bootSince(last)
			if m.Peer.Seen && m.State == cluster.Second && silence > n.precheckAfter() {
				n.startPrecheck(last)
			}
			if m.Peer.Seen && silence > timeout {
				n.missed.Add(1)
				n.log.Warn("peer lost: no heartbeat", "peer", m.Peer.Name, "for", silence.Round(time.Millisecond))
				apply(cluster.Event{Kind: cluster.EvPeerLost})
			} else if !m.Peer.Seen && time.Since(start) > timeout {
				apply(cluster.Event{Kind: cluster.EvTick})
			}
			if m.State != cluster.Prim || !n.peerDeaf(m.Peer) {
				deafDropped = false
			} else if !deafDropped && n.streaming() {
				// Our batches take the path our heartbeats take: they
				// are lost too, and the calls waiting for them would
				// wait until TCP gives up. Ended, the connection
				// stops streaming, the heartbeats stop saying
				// "synced", and the stale peer lets calls go on
				// (staleCurrent). Once per episode: a connection that
				// comes back while the peer still does not hear us
				// (heartbeats lost, the data path working) gets its
				// acks through, and calls go on with them.
				deafDropped = true
				n.log.Warn("the peer says its copy is stale and has not heard this node for longer than cluster.timeout: the path to it loses what this node sends", "peer", m.Peer.Name)
				n.smu.RLock()
				for _, p := range n.primaries {
					p.Drop("the peer does not hear this node")
				}
				n.smu.RUnlock()
			}
			// peerSynced is asked only when a peer_back is owed: it may
			// drain the capture.
			back := m.Peer.Seen && (m.Peer.State.Serving() ||
				m.State == cluster.Prim && m.Peer.State == cluster.Second && n.hooks.owed() && n.peerSynced())
			n.hooks.tick(peerView{now: time.Now(), serving: m.State.Serving(), heard: m.Peer.Seen, back: back})
			// Failback: the preferred node is back and a mirror; after
			// failback_delay of that, hand the role back to it.
			if pref := n.cfg.Cluster.Prefer; failbackCandidate(m, pref) && n.peerSynced() {
				if mirrorSince.IsZero() {
					mirrorSince = time.Now()
				} else if time.Since(mirrorSince) >= n.cfg.Cluster.FailbackDelay {
					mirrorSince = time.Time{}
					n.log.Info("failback: " + pref + " is preferred and has been a mirror for " +
						n.cfg.Cluster.FailbackDelay.String() + ": handing the role back")
					if r := apply(cluster.Event{Kind: cluster.EvCmdSwap}); !strings.HasPrefix(r, "ok") {
						n.log.Warn("failback refused", "reason", r)
					}
				}
			} else {
				mirrorSince = time.Time{}
			}
		}
	}
}

// watchWitness pings the witness every second while this node serves
// without its peer: when it is unreachable too, this node is the isolated
// one (isolation); when it answers, durability calls held for the lost
// peer may be released (witnessOK). Its own goroutine, not the cluster
// loop's: the loop waits for services to start as it takes over, and a
// service's durability calls at start wait for this answer.
func (n *Node) watchWitness(ctx context.Context, isolation chan<- struct{}) {
	t := time.NewTicker(min(n.cfg.Cluster.Interval, 100*time.Millisecond))
	defer t.Stop()
	var last time.Time
	fails := 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if m := n.machine.Load(); !m.State.Serving() || m.Peer.Seen {
			fails = 0
			continue
		}
		if time.Since(last) < time.Second {
			continue
		}
		last = time.Now()
		if err := n.pingWitness(); err != nil {
			if fails++; fails >= 2 {
				n.log.Warn("witness unreachable", "witness", n.cfg.Cluster.Witness, "err", err)
				select {
				case isolation <- struct{}{}:
				default:
				}
			}
			continue
		}
		fails = 0
		n.witnessOK.Store(bootNanos())
		n.wakePrimaries()
	}
}

// resyncing names the first directory whose copy a resync is rewriting
// (its Meta is not Consistent), or "". A copy of no lineage yet (Gen 0: a
// fresh node's) counts as whole: it is what a fresh pair's first primary
// serves, and a fresh copy that a resync is filling is stale already (its
// node saw the serving peer).
func resyncing(dirs []replica.Dir, metas []*replica.MetaStore) string {
	for i, ms := range metas {
		if m := ms.Get(); !m.Consistent && m.Gen != 0 {
			return dirs[i].Name
		}
	}
	return ""
}

func (n *Node) pingWitness() error {
	return vip.Ping(n.cfg.Cluster.Witness, 500*time.Millisecond)
}

// takeoverChecks decide whether this node may take over a peer it lost:
// it must not be waiting for its peer (startWaitCheck), it must reach
// the witness, nobody may answer for the VIP, and the
// fencing command must succeed. The VIP probe may have passed already, in
// the last stretch of the silence (see precheck). held reports a failure
// that found the role held elsewhere (the VIP answered: cluster.Event.Held).
func (n *Node) takeoverChecks(ctx context.Context) (ok bool, why string, held bool) {
	// A node waiting for its peer after a start checks nothing else.
	if ok, why := n.startWaitCheck(); !ok {
		return false, why, false
	}
	// The witness first, and after the peer was declared lost: a
	// primary releases the calls it holds once the witness answered
	// since then (peerCannotTakeOver).
	if ok, why := n.witnessCheck(); !ok {
		return false, why, false
	}
	if !n.prechecked(ctx) {
		if ok, why, held := n.vipCheck(); !ok {
			return false, why, held
		}
	}
	if f := n.cfg.Cluster.Fence; f != "" {
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		out, err := stack.Shell(cctx, f).CombinedOutput()
		if err != nil {
			return false, fmt.Sprintf("fencing command failed (%v): %s", err, trimOut(out)), false
		}
		n.log.Info("fencing command succeeded", "command", f)
	}
	return true, "", false
}

// A precheck runs the takeover's VIP probe, which touches nothing and
// waits vipProbeWait for an answer, while the peer has been silent for
// most of cluster.timeout: a takeover need not wait for it once the peer
// is declared lost. (The witness ping takes one round trip and is made
// after the loss; the fencing command, which powers the peer off, too.)
// It counts only for the silence it ran in.
type precheck struct {
	heartbeat int64         // lastHeartbeat when it started
	done      chan struct{} // closed when ok and at are set
	ok        bool
	at        time.Time // when it ended
}

// precheckFresh: a precheck that ended longer ago than this before the
// takeover is not used (the VIP probe says who answered then). A
// variable for the tests.
var precheckFresh = 300 * time.Millisecond

// precheckAfter is the silence after which a precheck starts: timeout
// less the probe's wait and two ticks of the loop, but not within the
// ordinary gap between two heartbeats (an interval, noticed up to a tick
// late), or a SECOND would probe after every heartbeat. With intervals so
// short that no room is left it is timeout, and no precheck runs.
func (n *Node) precheckAfter() time.Duration {
	cl := n.cfg.Cluster
	after := cl.Timeout - vipProbeWait - 2*n.loopTick()
	if floor := cl.Interval + 2*n.loopTick(); after < floor {
		return cl.Timeout
	}
	return after
}

// loopTick is the cluster loop's tick: how late after cluster.timeout a
// silent peer may be declared lost.
func (n *Node) loopTick() time.Duration { return n.cfg.Cluster.Interval / 4 }

// startPrecheck starts a precheck for the silence since the heartbeat
// received at hb (bootNanos) unless one runs or ran for it.
func (n *Node) startPrecheck(hb int64) {
	if n.vip == nil && n.vipProbe == nil {
		return // nothing to probe ahead
	}
	if pc := n.pre.Load(); pc != nil && pc.heartbeat == hb {
		return
	}
	pc := &precheck{heartbeat: hb, done: make(chan struct{})}
	n.pre.Store(pc)
	go func() {
		defer close(pc.done)
		pc.ok, _, _ = n.vipCheck()
		pc.at = time.Now()
	}()
}

// prechecked waits for the precheck of the current silence, if one was
// started, and reports whether it passed recently enough to stand for
// the VIP probe.
func (n *Node) prechecked(ctx context.Context) bool {
	pc := n.pre.Load()
	if pc == nil || pc.heartbeat != n.lastHeartbeat.Load() {
		return false
	}
	select {
	case <-pc.done:
	case <-ctx.Done():
		return false
	}
	// A heartbeat that came meanwhile voids it.
	if !pc.ok || time.Since(pc.at) > precheckFresh || pc.heartbeat != n.lastHeartbeat.Load() {
		return false
	}
	n.vipFreeAt.Store(bootNanos() - int64(time.Since(pc.at)))
	return true
}

// witnessCheck: the witness, if any, answers a ping (3 tries).
func (n *Node) witnessCheck() (bool, string) {
	w := n.cfg.Cluster.Witness
	if w == "" {
		return true, ""
	}
	var err error
	for try := 0; try < 3; try++ {
		if err = n.pingWitness(); err == nil {
			break
		}
	}
	if err != nil {
		return false, fmt.Sprintf("witness %s unreachable (%v): this node may be the isolated one", w, err)
	}
	n.witnessOK.Store(bootNanos())
	return true, ""
}

// vipCheck: nobody answers an ARP probe for the VIP, if any. held: a
// host answered (not a probe that could not be made).
func (n *Node) vipCheck() (ok bool, why string, held bool) {
	if n.vipProbe != nil {
		ok, why := n.vipProbe()
		return ok, why, !ok
	}
	if n.vip == nil {
		return true, "", false
	}
	owner, err := n.vip.Probe(vipProbeWait)
	if err != nil {
		return false, fmt.Sprintf("probing VIP %s: %v", n.vip, err), false
	}
	if owner != nil {
		return false, fmt.Sprintf("VIP %s is answered by %s: the old primary is alive (a network split?) or another host uses the address", n.vip.Prefix.Addr(), owner), true
	}
	n.vipFreeAt.Store(bootNanos())
	return true, "", false
}

func trimOut(b []byte) string {
	if len(b) > 300 {
		b = b[len(b)-300:]
	}
	return string(b)
}

// Command sends an operator command to the cluster loop.
func (n *Node) command(ctx context.Context, ev cluster.Event) string {
	c := command{ev: ev, reply: make(chan string, 1)}
	select {
	case n.cmds <- c:
	case <-ctx.Done():
		return "error: daemon stopping"
	}
	select {
	case r := <-c.reply:
		return r
	case <-ctx.Done():
		return "error: daemon stopping"
	}
}
