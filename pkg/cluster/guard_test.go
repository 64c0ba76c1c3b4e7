package cluster

import (
	"math/rand"
	"testing"
	"time"
)

const (
	simInterval = 200 * time.Millisecond // cluster.interval's default
	simMaxAge   = 1500 * time.Millisecond
	simLatency  = 2 * time.Millisecond
)

var simKey = []byte("0123456789abcdef")

// simClock is a host's raw monotonic clock: its reading at world time 0
// and how many ppm it runs fast (negative: slow).
type simClock struct {
	base time.Duration
	ppm  int64
}

func (c simClock) at(w time.Duration) time.Duration {
	return c.base + w + w/1e6*time.Duration(c.ppm)
}

// simRun is one daemon run: a guard on a host's clock.
type simRun struct {
	name  string
	clock simClock
	g     *Guard
	next  time.Duration // world time of its next heartbeat
	up    bool
	first time.Duration // world time it started
}

type simPacket struct {
	at   time.Duration
	from *simRun
	toA  bool // to host a, whichever run it is in
	b    []byte
}

// sim carries heartbeats between two runs, a and b, on world time.
type sim struct {
	rnd  *rand.Rand
	now  time.Duration
	a, b *simRun
	air  []simPacket
	// lose drops a packet before it is delivered (it was still sent, and
	// tap saw it); tap records what an attacker on the path records.
	lose func(from *simRun) bool
	tap  func(from *simRun, b []byte)
	// delay is added to simLatency: a congested link's queues.
	delay time.Duration
	// accepted lists, per receiving run, the world times of the accepted
	// heartbeats and their sender's Boot.
	accepted map[*simRun][]simAccept
	// refused counts genuine heartbeats delivered first time, in order,
	// that their receiver refused.
	refused int
	lastSeq map[*simRun]uint64
}

type simAccept struct {
	at   time.Duration
	boot uint64
}

func newSim(seed int64, a, b simClock) *sim {
	s := &sim{rnd: rand.New(rand.NewSource(seed)), accepted: map[*simRun][]simAccept{}, lastSeq: map[*simRun]uint64{}}
	s.a, s.b = s.start("a", a), s.start("b", b)
	s.b.next = time.Duration(s.rnd.Int63n(int64(simInterval)))
	s.b.first = s.b.next
	return s
}

// start begins a daemon run on a host with clock c: it sends its first
// heartbeat at once, as the daemon does.
func (s *sim) start(name string, c simClock) *simRun {
	boot := s.rnd.Uint64() | 1
	return &simRun{name: name, clock: c, g: NewGuard(boot, simMaxAge), up: true, first: s.now, next: s.now}
}

// restart ends run r and starts the next one on the same host after down.
func (s *sim) restart(r **simRun, down time.Duration) {
	(*r).up = false
	s.run(down)
	*r = s.start((*r).name, (*r).clock)
}

// run advances world time by d, sending and delivering heartbeats.
func (s *sim) run(d time.Duration) {
	end := s.now + d
	for {
		next := end
		for _, r := range []*simRun{s.a, s.b} {
			if r.up && r.next < next {
				next = r.next
			}
		}
		for _, p := range s.air {
			if p.at < next {
				next = p.at
			}
		}
		s.now = next
		if next == end {
			return
		}
		for _, r := range []*simRun{s.a, s.b} {
			if r.up && r.next == s.now {
				s.send(r)
			}
		}
		air := s.air[:0]
		for _, p := range s.air {
			if p.at == s.now {
				s.deliver(p)
			} else {
				air = append(air, p)
			}
		}
		s.air = air
	}
}

func (s *sim) send(r *simRun) {
	r.next += simInterval
	h := Heartbeat{Name: r.name, State: Second}
	r.g.Stamp(&h, r.clock.at(s.now))
	b := h.Marshal(simKey)
	if s.tap != nil {
		s.tap(r, b)
	}
	if s.lose != nil && s.lose(r) {
		return
	}
	s.air = append(s.air, simPacket{at: s.now + simLatency + s.delay, from: r, toA: r.name == "b", b: b})
}

func (s *sim) deliver(p simPacket) {
	to := s.b
	if p.toA {
		to = s.a
	}
	if !to.up {
		return
	}
	h, err := ParseHeartbeat(p.b, simKey)
	if err != nil {
		panic(err)
	}
	ok := to.g.Accept(&h, to.clock.at(s.now))
	if ok {
		to.g.Applied(&h)
		s.accepted[to] = append(s.accepted[to], simAccept{s.now, h.Boot})
	}
	// A genuine heartbeat of the sender's current run, newer than the
	// last delivered: it must count unless the receiver's run cannot
	// have been echoed yet (the first exchanges after a start).
	if p.from.up && h.Seq > s.lastSeq[p.from] {
		s.lastSeq[p.from] = h.Seq
		settled := s.now-p.from.first > 3*simInterval+2*simLatency && s.now-to.first > 3*simInterval+2*simLatency
		if !ok && settled {
			s.refused++
		}
	}
}

// firstAccept is the world time at which to first accepted a heartbeat
// of run from, or -1.
func (s *sim) firstAccept(to, from *simRun) time.Duration {
	for _, a := range s.accepted[to] {
		if a.boot == from.g.boot {
			return a.at
		}
	}
	return -1
}

// clocks of two edge nodes: hours apart, one fast and one slow.
var (
	clockA = simClock{base: 5 * time.Hour, ppm: 100}
	clockB = simClock{base: 7 * time.Minute, ppm: -100}
)

// TestHeartbeatReplay: an attacker on the heartbeat network records the
// peer's heartbeats over three of its runs (holding back some of the last
// run's, which the receiver never got) and replays all 1000 once the
// peer is dead. None may show the peer alive, also not to a receiver
// restarted since.
func TestHeartbeatReplay(t *testing.T) {
	s := newSim(1, clockA, clockB)
	recv, peer := s.a, &s.b
	var taped [3][][]byte
	boot := 0
	s.tap = func(from *simRun, b []byte) {
		if from != recv {
			taped[boot] = append(taped[boot], b)
		}
	}
	s.run(70 * time.Second)
	boot = 1
	s.restart(peer, 3*time.Second)
	s.run(70 * time.Second)
	boot = 2
	s.restart(peer, 3*time.Second)
	// The last run's every fifth heartbeat never reaches the receiver:
	// the attacker keeps it.
	n := 0
	s.lose = func(from *simRun) bool {
		n++
		return from != recv && n%5 == 0
	}
	s.run(70 * time.Second)
	s.lose = nil
	if s.refused != 0 {
		t.Fatalf("%d genuine heartbeats refused while recording", s.refused)
	}
	if len(s.accepted[recv]) == 0 {
		t.Fatal("the receiver accepted none of the peer's heartbeats while it was alive")
	}
	(*peer).up = false
	s.run(simMaxAge + simInterval)

	// 333 or 334 of each run, interleaved as an attacker would send them.
	var replay [][]byte
	for i := 0; len(replay) < 1000; i++ {
		for k := range taped {
			if i < len(taped[k]) && len(replay) < 1000 {
				replay = append(replay, taped[k][len(taped[k])-1-i])
			}
		}
	}
	// clock is the receiver's clock reading as the attacker replays h.
	attack := func(g *Guard, clock func(h *Heartbeat) time.Duration) int {
		got := 0
		for _, b := range replay {
			h, err := ParseHeartbeat(b, simKey)
			if err != nil {
				t.Fatal(err)
			}
			if g.Accept(&h, clock(&h)) {
				got++
			}
			s.run(time.Millisecond)
		}
		return got
	}
	got := attack(recv.g, func(*Heartbeat) time.Duration { return recv.clock.at(s.now) })
	t.Logf("replayed heartbeats accepted: %d of %d", got, len(replay))
	if got != 0 {
		t.Errorf("replayed heartbeats accepted: %d of %d: a dead peer looks alive", got, len(replay))
	}

	s.restart(&s.a, time.Second)
	s.run(5 * time.Second)
	got = attack(s.a.g, func(*Heartbeat) time.Duration { return s.a.clock.at(s.now) })
	t.Logf("after the receiver's restart, replayed heartbeats accepted: %d of %d", got, len(replay))
	if got != 0 {
		t.Errorf("after the receiver's restart, replayed heartbeats accepted: %d of %d", got, len(replay))
	}

	// The receiver's host rebooted: its clock starts again from zero, and
	// the attacker replays each heartbeat when it reads what it read as
	// the heartbeat was made.
	rebooted := NewGuard(s.rnd.Uint64()|1, simMaxAge)
	got = attack(rebooted, func(h *Heartbeat) time.Duration { return h.EchoTime + 2*simLatency })
	t.Logf("after the receiver's host rebooted, replayed heartbeats accepted: %d of %d", got, len(replay))
	if got != 0 {
		t.Errorf("after the receiver's host rebooted, replayed heartbeats accepted: %d of %d", got, len(replay))
	}
}

// TestHeartbeatRestartAcceptedQuickly: a restarted daemon, on either side,
// is heard within two intervals (its second heartbeat echoes the other's),
// with clocks hours apart and drifting; it hears the other within three
// (the other echoes it from its next heartbeat on).
func TestHeartbeatRestartAcceptedQuickly(t *testing.T) {
	for _, tc := range []struct {
		name    string
		restart func(s *sim)
	}{
		{"pair starts", func(s *sim) {}},
		{"peer restarts at once", func(s *sim) { s.restart(&s.b, 0) }},
		{"peer restarts after 5s", func(s *sim) { s.restart(&s.b, 5*time.Second) }},
		{"receiver restarts", func(s *sim) { s.restart(&s.a, 300*time.Millisecond) }},
		{"both restart", func(s *sim) { s.a.up = false; s.restart(&s.b, time.Second); s.a = s.start("a", s.a.clock) }},
	} {
		for seed := int64(0); seed < 20; seed++ {
			s := newSim(seed, clockA, clockB)
			if tc.name != "pair starts" {
				s.run(time.Minute)
			}
			tc.restart(s)
			s.run(10 * time.Second)
			for _, d := range [][2]*simRun{{s.a, s.b}, {s.b, s.a}} {
				to, from := d[0], d[1]
				at := s.firstAccept(to, from)
				started := max(to.first, from.first)
				within := 2*simInterval + 2*simLatency
				if from.first < to.first {
					within += simInterval
				}
				if at < 0 || at-started > within {
					t.Errorf("%s (seed %d): %s first accepted %s's run %v after both ran (-1: never), want within %v",
						tc.name, seed, to.name, from.name, at-started, within)
				}
			}
			if s.refused != 0 {
				t.Errorf("%s (seed %d): %d genuine heartbeats refused", tc.name, seed, s.refused)
			}
		}
	}
}

// TestHeartbeatGenuineAccepted: with loss, and with one direction cut for
// half an hour (the side that still hears its peer must hear it announce
// ALONE: the peer's echo stays old), every genuine heartbeat delivered in
// order is accepted.
func TestHeartbeatGenuineAccepted(t *testing.T) {
	for _, tc := range []struct {
		name string
		lose func(s *sim) func(*simRun) bool
	}{
		{"30% loss both ways", func(s *sim) func(*simRun) bool {
			return func(*simRun) bool { return s.rnd.Intn(10) < 3 }
		}},
		{"a to b cut", func(s *sim) func(*simRun) bool {
			return func(r *simRun) bool { return r == s.a }
		}},
		{"b to a cut", func(s *sim) func(*simRun) bool {
			return func(r *simRun) bool { return r == s.b }
		}},
	} {
		// The last pair drifts apart by 1.62 s in the half hour: more
		// than maxAge, yet within MaxClockDrift.
		for _, clocks := range [][2]simClock{{clockA, clockB}, {clockB, clockA}, {{base: clockA.base, ppm: 450}, {base: clockB.base, ppm: -450}}} {
			s := newSim(3, clocks[0], clocks[1])
			s.run(10 * time.Second)
			before := len(s.accepted[s.a]) + len(s.accepted[s.b])
			s.lose = tc.lose(s)
			s.run(30 * time.Minute)
			s.lose = nil
			s.run(10 * time.Second)
			if s.refused != 0 {
				t.Errorf("%s, clocks %v: %d genuine heartbeats refused", tc.name, clocks, s.refused)
			}
			if after := len(s.accepted[s.a]) + len(s.accepted[s.b]); after-before < 8500 {
				t.Errorf("%s, clocks %v: only %d heartbeats accepted in 30 minutes", tc.name, clocks, after-before)
			}
		}
	}
}

// TestHeartbeatOrder: within the peer's run a heartbeat counts once and in
// order; one held back counts only while it is younger than maxAge; a
// heartbeat heard but refused does not change what this node echoes once
// it accepted one.
func TestHeartbeatOrder(t *testing.T) {
	const now0 = 10 * time.Second
	peer := NewGuard(2, simMaxAge)
	local := NewGuard(1, simMaxAge)
	var mine Heartbeat
	local.Stamp(&mine, now0)
	heard := func(h Heartbeat) { peer.Accept(&h, time.Hour) }
	heard(mine) // the peer's clock reads an hour
	hb := func(at time.Duration) Heartbeat {
		var h Heartbeat
		peer.Stamp(&h, time.Hour+at)
		return h
	}
	h1, h2, h3 := hb(time.Millisecond), hb(2*time.Millisecond), hb(3*time.Millisecond)
	late := hb(4 * time.Millisecond)
	h5 := hb(simMaxAge + 11*time.Millisecond)
	old := NewGuard(3, simMaxAge) // an earlier run of the peer
	var stale Heartbeat
	old.Stamp(&stale, 0)

	for _, st := range []struct {
		name string
		h    Heartbeat
		at   time.Duration // the local clock, after now0
		want bool
	}{
		{"first, echoing our challenge", h1, 3 * time.Millisecond, true},
		{"the same again (another network)", h1, 4 * time.Millisecond, false},
		{"next but one", h3, 5 * time.Millisecond, true},
		{"the skipped one, late", h2, 6 * time.Millisecond, false},
		{"an earlier run of the peer", stale, 7 * time.Millisecond, false},
		{"held back for longer than maxAge", late, simMaxAge + 10*time.Millisecond, false},
		{"the next one, on time", h5, simMaxAge + 12*time.Millisecond, true},
		{"an earlier run of the peer, again", stale, simMaxAge + 13*time.Millisecond, false},
	} {
		h := st.h
		got := local.Accept(&h, now0+st.at)
		if got != st.want {
			t.Errorf("%s: accepted %v, want %v", st.name, got, st.want)
		}
		if got {
			local.Applied(&h)
		}
	}
	var next Heartbeat
	local.Stamp(&next, now0+time.Second)
	if next.EchoBoot != 2 || next.EchoTime != h5.Time {
		t.Errorf("echo after a refused heartbeat: boot %d time %v, want the last accepted: boot 2 time %v", next.EchoBoot, next.EchoTime, h5.Time)
	}

	fresh := NewGuard(4, simMaxAge)
	future := h5
	future.Seq, future.EchoBoot, future.EchoTime = 9, 4, time.Hour
	if fresh.Accept(&future, time.Minute) {
		t.Error("a heartbeat echoing a time of ours still to come accepted")
	}
}

// suspend stops host r for d: its run is frozen, and so is its raw
// monotonic clock (CLOCK_MONOTONIC_RAW does not count suspend; a paused
// VM's clock stands still too).
func (s *sim) suspend(r *simRun, d time.Duration) {
	r.up = false
	s.run(d)
	r.clock.base -= d
	r.up, r.next = true, s.now
}

// TestHeartbeatSuspendDuringOneWayCut: b stops hearing a (one direction
// cut), b's host is suspended for 5 s, then the cut heals. a's clock ran
// on while b's stood still: a cannot age b's heartbeats through its old
// anchor any more, and b's copy of a's echo is older than maxAge. Once the
// network is whole again, both must hear each other; a pair that never
// does again leaves the primary ALONE for good, or both serving.
func TestHeartbeatSuspendDuringOneWayCut(t *testing.T) {
	for _, suspended := range []string{"a", "b"} {
		s := newSim(5, clockA, clockB)
		s.run(10 * time.Second)
		r, other := s.b, s.a
		if suspended == "a" {
			r, other = s.a, s.b
		}
		s.lose = func(from *simRun) bool { return from == other }
		s.run(10 * time.Second)
		s.suspend(r, 5*time.Second)
		s.run(10 * time.Second)
		s.lose = nil
		s.run(5 * time.Second)
		healed := s.now
		s.run(5 * time.Second)
		for _, to := range []*simRun{s.a, s.b} {
			n := 0
			for _, a := range s.accepted[to] {
				if a.at >= healed {
					n++
				}
			}
			if n < 20 {
				t.Errorf("%s suspended while it did not hear the other: %s accepted %d of the other's 25 heartbeats from 5 s after the cut healed, want all",
					suspended, to.name, n)
			}
		}
	}
}

// TestHeartbeatLatencyRise: the link's latency rises to 800 ms each way
// (queues of a congested link): every heartbeat still arrives within
// maxAge of being sent, and must count. Aged through a new echo alone, a
// heartbeat looks a round trip plus an interval old, 1.8 s: refused both
// ways, each node would declare a live peer lost.
func TestHeartbeatLatencyRise(t *testing.T) {
	s := newSim(7, clockA, clockB)
	s.run(5 * time.Second)
	s.delay = 800 * time.Millisecond
	s.run(2 * time.Second)
	from := s.now
	s.run(10 * time.Second)
	for _, to := range []*simRun{s.a, s.b} {
		n := 0
		for _, a := range s.accepted[to] {
			if a.at >= from {
				n++
			}
		}
		if n < 45 {
			t.Errorf("%s accepted %d of the other's 50 heartbeats in 10 s at 800 ms latency, want all", to.name, n)
		}
	}
}

// TestEchoFollowsApplied: a heartbeat accepted but whose state the node
// has not applied yet is not echoed. The peer reads the echo as "the
// state this heartbeat reports took yours into account" before it
// releases a write without this node; echoed at Accept, a secondary
// about to turn SECOND on a "synced" heartbeat could still report itself
// stale while echoing it.
func TestEchoFollowsApplied(t *testing.T) {
	const now0 = 10 * time.Second
	peer, local := NewGuard(2, simMaxAge), NewGuard(1, simMaxAge)
	var mine Heartbeat
	local.Stamp(&mine, now0)
	peer.Accept(&mine, time.Hour) // heard, not accepted: echoed as a challenge
	h1 := stamp(peer, time.Hour+time.Millisecond)
	if !local.Accept(&h1, now0+2*time.Millisecond) {
		t.Fatal("the peer's first heartbeat, echoing ours, refused")
	}
	local.Applied(&h1)
	h2 := stamp(peer, time.Hour+2*time.Millisecond)
	if !local.Accept(&h2, now0+3*time.Millisecond) {
		t.Fatal("the peer's second heartbeat refused")
	}
	if e := stamp(local, now0+4*time.Millisecond); e.EchoBoot != 2 || e.EchoTime != h1.Time {
		t.Errorf("echo before h2 was applied: boot %d time %v, want the applied h1 (boot 2 time %v)", e.EchoBoot, e.EchoTime, h1.Time)
	}
	local.Applied(&h2)
	local.Applied(&h1) // applied late (another network): the echo does not go back
	if e := stamp(local, now0+5*time.Millisecond); e.EchoBoot != 2 || e.EchoTime != h2.Time {
		t.Errorf("echo once h2 was applied: boot %d time %v, want h2 (boot 2 time %v)", e.EchoBoot, e.EchoTime, h2.Time)
	}
}

// TestReplacedRunRefused: once the peer's restarted run is heard, a
// heartbeat of its earlier run (held back in the network, or replayed
// while it still echoes a recent time of ours) is refused: it would bring
// back the old run's state, a PRIM saying "synced" at its old epoch, to a
// copy the new run has just been told is stale.
func TestReplacedRunRefused(t *testing.T) {
	const now0 = 10 * time.Second
	local := NewGuard(1, simMaxAge)
	oldRun, newRun := NewGuard(2, simMaxAge), NewGuard(3, simMaxAge)
	var mine Heartbeat
	local.Stamp(&mine, now0)
	oldRun.Accept(&mine, time.Hour) // heard: echoed as a challenge
	newRun.Accept(&mine, 2*time.Hour)
	a1 := stamp(oldRun, time.Hour+time.Millisecond)
	if !local.Accept(&a1, now0+2*time.Millisecond) {
		t.Fatal("the old run's heartbeat refused while it was the peer's run")
	}
	late := stamp(oldRun, time.Hour+3*time.Millisecond) // sent before the old run died
	b1 := stamp(newRun, 2*time.Hour+time.Millisecond)
	if !local.Accept(&b1, now0+5*time.Millisecond) {
		t.Fatal("the restarted run's first heartbeat, echoing ours, refused")
	}
	if local.Accept(&late, now0+6*time.Millisecond) {
		t.Error("a heartbeat of the replaced run, arriving after the new run was heard, accepted")
	}
	if !local.Retired(2) || local.Retired(3) {
		t.Errorf("retired: old run %v (want true), new run %v (want false)", local.Retired(2), local.Retired(3))
	}
	b2 := stamp(newRun, 2*time.Hour+7*time.Millisecond)
	if !local.Accept(&b2, now0+8*time.Millisecond) {
		t.Error("the new run's next heartbeat refused after the old run's was")
	}
}

// stamp is a heartbeat g makes at its clock reading at.
func stamp(g *Guard, at time.Duration) Heartbeat {
	var h Heartbeat
	g.Stamp(&h, at)
	return h
}
