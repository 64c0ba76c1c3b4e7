package cluster

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// Heartbeat is what a node tells its peer several times a second on every
// heartbeat network.
type Heartbeat struct {
	Name      string
	State     State
	Epoch     uint64
	Stale     bool
	Preferred bool
	Synced    bool // serving: the receiver's copy is in sync
	Handover  bool // the sender gave the primary role to the receiver
	Boot      uint64
	Seq       uint64 // increases within one Boot
}

const (
	hbMagic   = "DUHB"
	hbVersion = 1
	hbHeader  = 4 + 1 + 1 + 1 + 1 + 8 + 8 + 8
	hbMAC     = 16
	// MaxHeartbeat bounds a heartbeat datagram.
	MaxHeartbeat = hbHeader + 63 + hbMAC
)

const (
	flagStale = 1 << iota
	flagPreferred
	flagSynced
	flagHandover
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
	for bit, on := range map[byte]bool{flagStale: h.Stale, flagPreferred: h.Preferred, flagSynced: h.Synced, flagHandover: h.Handover} {
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
	if len(b) < hbHeader+hbMAC || string(b[:4]) != hbMagic {
		return h, ErrHeartbeatForm
	}
	if b[4] != hbVersion {
		return h, fmt.Errorf("heartbeat version %d: this duet speaks %d (upgrade both nodes)", b[4], hbVersion)
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
	h.Epoch = binary.BigEndian.Uint64(b[8:])
	h.Boot = binary.BigEndian.Uint64(b[16:])
	h.Seq = binary.BigEndian.Uint64(b[24:])
	h.Name = string(b[hbHeader : hbHeader+n])
	return h, nil
}

// Peer converts a heartbeat into the machine's view of its sender.
func (h *Heartbeat) Peer() Peer {
	return Peer{Seen: true, Name: h.Name, State: h.State, Epoch: h.Epoch, Stale: h.Stale,
		Preferred: h.Preferred, Synced: h.Synced, Handover: h.Handover}
}

// Replay drops heartbeats that are not newer than the last accepted one
// of the same boot: a recorded heartbeat replayed later must not make a
// dead peer look alive.
type Replay struct {
	boot, seq uint64
}

// Fresh reports whether h is newer than every heartbeat accepted so far,
// and remembers it if so. A new boot starts a new sequence.
func (r *Replay) Fresh(h *Heartbeat) bool {
	if h.Boot == r.boot && h.Seq <= r.seq {
		return false
	}
	r.boot, r.seq = h.Boot, h.Seq
	return true
}
