package cluster

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// Heartbeat is what a node tells its peer several times a second on every
// heartbeat network. Boot, Seq, Time and the echo are filled by the
// sender's Guard (Stamp); they let the receiver's Guard tell a heartbeat
// sent just now from a recorded one.
type Heartbeat struct {
	Name      string
	State     State
	Epoch     uint64
	Stale     bool
	Preferred bool
	Synced    bool // serving: the receiver's copy is in sync
	Handover  bool // the sender gave the primary role to the receiver
	// Shared: the sender serves in a term the receiver has known
	// (Machine.Shared). StaleHeld: the sender says stale only because a
	// check found the role held elsewhere (Machine.StaleHeld).
	// ServiceFailed: the sender gave the role up because a service
	// failed there (Machine.ServiceFailed). A receiver of an older
	// version ignores these flags. Yields: set by every sender of this
	// version (Peer.Yields).
	Shared        bool
	StaleHeld     bool
	ServiceFailed bool
	Yields        bool
	Boot          uint64
	Seq           uint64 // increases within one Boot
	// Time is the sender's clock when it sent the heartbeat: a raw
	// monotonic clock (CLOCK_MONOTONIC_RAW), meaningful only next to
	// other readings on the same host.
	Time time.Duration
	// EchoBoot and EchoTime repeat the Boot and Time of a heartbeat the
	// sender heard from the receiver (zero before it heard any): the
	// receiver's own clock then bounds how old this heartbeat is.
	EchoBoot uint64
	EchoTime time.Duration
}

const (
	hbMagic = "DUHB"
	// hbVersion 2 added Time and the echo; version 1's heartbeats could
	// be replayed from an earlier run of their sender.
	hbVersion = 2
	hbHeader  = 4 + 1 + 1 + 1 + 1 + 8 + 8 + 8 + 8 + 8 + 8
	hbMAC     = 16
	// MaxHeartbeat bounds a heartbeat datagram.
	MaxHeartbeat = hbHeader + 63 + hbMAC
)

const (
	flagStale = 1 << iota
	flagPreferred
	flagSynced
	flagHandover
	flagShared
	flagStaleHeld
	flagServiceFailed
	flagYields // the flag byte is full: another flag needs a new hbVersion
)

// Heartbeat errors.
var (
	ErrHeartbeatAuth = errors.New("heartbeat authentication failed (do both nodes use the same key?)")
	ErrHeartbeatForm = errors.New("malformed heartbeat")
)

// Marshal encodes and authenticates h with key.
func (h *Heartbeat) Marshal(key []byte) []byte {
	b := make([]byte, hbHeader, MaxHeartbeat)
	copy(b, hbMagic)
	b[4] = hbVersion
	b[5] = byte(h.State)
	var f byte
	for bit, on := range map[byte]bool{flagStale: h.Stale, flagPreferred: h.Preferred, flagSynced: h.Synced, flagHandover: h.Handover, flagShared: h.Shared, flagStaleHeld: h.StaleHeld, flagServiceFailed: h.ServiceFailed, flagYields: h.Yields} {
		if on {
			f |= bit
		}
	}
	b[6] = f
	name := h.Name
	if len(name) > 63 {
		name = name[:63]
	}
	b[7] = byte(len(name))
	binary.BigEndian.PutUint64(b[8:], h.Epoch)
	binary.BigEndian.PutUint64(b[16:], h.Boot)
	binary.BigEndian.PutUint64(b[24:], h.Seq)
	binary.BigEndian.PutUint64(b[32:], uint64(h.Time))
	binary.BigEndian.PutUint64(b[40:], h.EchoBoot)
	binary.BigEndian.PutUint64(b[48:], uint64(h.EchoTime))
	b = append(b, name...)
	return append(b, mac(key, b)...)
}

func mac(key, b []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte("duet heartbeat"))
	m.Write(b)
	return m.Sum(nil)[:hbMAC]
}

// ParseHeartbeat checks and decodes one datagram.
func ParseHeartbeat(b, key []byte) (Heartbeat, error) {
	var h Heartbeat
	// The version is read before the length: another version's
	// heartbeat has another length, and its sender's operator needs to
	// hear about the version.
	if len(b) < 5 || string(b[:4]) != hbMagic {
		return h, ErrHeartbeatForm
	}
	if b[4] != hbVersion {
		return h, fmt.Errorf("heartbeat version %d: this duet speaks %d (run the same duet version on both nodes)", b[4], hbVersion)
	}
	if len(b) < hbHeader+hbMAC {
		return h, ErrHeartbeatForm
	}
	n := int(b[7])
	if len(b) != hbHeader+n+hbMAC {
		return h, ErrHeartbeatForm
	}
	body := b[:hbHeader+n]
	if !hmac.Equal(mac(key, body), b[hbHeader+n:]) {
		return h, ErrHeartbeatAuth
	}
	if b[5] > byte(Alone) {
		return h, fmt.Errorf("%w: state %d", ErrHeartbeatForm, b[5])
	}
	h.State = State(b[5])
	f := b[6]
	h.Stale, h.Preferred, h.Synced, h.Handover = f&flagStale != 0, f&flagPreferred != 0, f&flagSynced != 0, f&flagHandover != 0
	h.Shared, h.StaleHeld, h.ServiceFailed, h.Yields = f&flagShared != 0, f&flagStaleHeld != 0, f&flagServiceFailed != 0, f&flagYields != 0
	h.Epoch = binary.BigEndian.Uint64(b[8:])
	h.Boot = binary.BigEndian.Uint64(b[16:])
	h.Seq = binary.BigEndian.Uint64(b[24:])
	h.Time = time.Duration(binary.BigEndian.Uint64(b[32:]))
	h.EchoBoot = binary.BigEndian.Uint64(b[40:])
	h.EchoTime = time.Duration(binary.BigEndian.Uint64(b[48:]))
	h.Name = string(b[hbHeader : hbHeader+n])
	return h, nil
}

// Peer converts a heartbeat into the machine's view of its sender.
func (h *Heartbeat) Peer() Peer {
	return Peer{Seen: true, Name: h.Name, State: h.State, Epoch: h.Epoch, Stale: h.Stale,
		Preferred: h.Preferred, Synced: h.Synced, Handover: h.Handover, Shared: h.Shared, StaleHeld: h.StaleHeld, ServiceFailed: h.ServiceFailed, Yields: h.Yields,
		Boot: h.Boot, Seq: h.Seq, Time: h.Time, EchoBoot: h.EchoBoot, EchoTime: h.EchoTime}
}
