package wire

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// Purpose says what a connection is for.
type Purpose uint8

// Connection purposes.
const (
	PurposeReplicate Purpose = 1 // the primary streams batches
	PurposeManifest  Purpose = 2 // a one-shot manifest request (verify)
)

// Hello opens a connection.
type Hello struct {
	Purpose Purpose
	Nonce   [32]byte
	Session uint64 // the sender's session: batch sequences restart with it
	Dir     string // the replicated directory's name
	// Epoch is the sending primary's cluster epoch (cluster.Machine),
	// 0 when unknown (a manifest request, a sender of an older version,
	// which does not send it). The replica refuses a stream from an
	// older epoch than its own copy's while it does not count its copy
	// stale (Server.Admit).
	Epoch uint64
}

// Welcome is the server's answer after a successful handshake: what the
// replica last applied, so a sender can resume, and what its copy is, so
// a sender that cannot resume knows how much to compare.
type Welcome struct {
	Session uint64
	Applied uint64
	// Gen is the generation (content lineage) the replica's copy follows,
	// 0 when unknown; SyncTime (unix ns, the replica's clock) the last
	// point at which every change of its copy was on its disk.
	Gen      uint64
	SyncTime int64
	State    CopyState
	// Sealed: the server accepts sealed frames (FlagSealed), as the
	// welcome frame's FlagSealedOK says.
	Sealed bool
}

// CopyState says how far a replica's copy can be trusted.
type CopyState uint8

// Copy states.
const (
	// CopyConsistent: the copy was whole (no resync into it was cut
	// short) when it was last written.
	CopyConsistent CopyState = 1 << 0
	// CopyDiverged: the copy may hold changes its peer never received:
	// it was the source of Gen and did not hand over cleanly, or its
	// node crashed (writes in flight).
	CopyDiverged CopyState = 1 << 1
	// CopySource: the node was the source (primary) of Gen.
	CopySource CopyState = 1 << 2
)

const welcomeSize = 8 + 8 + 8 + 8 + 1

// ErrAuth is returned when a peer fails to prove it knows the key.
var ErrAuth = errors.New("peer authentication failed (do both nodes use the same key?)")

func proof(key []byte, who string, a, b []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(who))
	m.Write(a)
	m.Write(b)
	return m.Sum(nil)
}

func encodeHello(h *Hello) []byte {
	b := []byte{byte(h.Purpose)}
	b = append(b, h.Nonce[:]...)
	b = binary.LittleEndian.AppendUint64(b, h.Session)
	b = appendString(b, h.Dir)
	if h.Epoch == 0 {
		return b
	}
	// After the directory's name: a decoder of an older version reads
	// the name and ignores the rest.
	return binary.LittleEndian.AppendUint64(b, h.Epoch)
}

// DecodeHello decodes a hello payload.
func DecodeHello(p []byte) (Hello, error) {
	var h Hello
	if len(p) < 1+32+8 {
		return h, fmt.Errorf("%w: hello of %d bytes", ErrBadFrame, len(p))
	}
	h.Purpose = Purpose(p[0])
	if h.Purpose != PurposeReplicate && h.Purpose != PurposeManifest {
		return h, fmt.Errorf("%w: unknown purpose %d", ErrBadFrame, p[0])
	}
	copy(h.Nonce[:], p[1:33])
	h.Session = binary.LittleEndian.Uint64(p[33:])
	d := decoder{b: p[41:]}
	h.Dir = string(d.bytes("directory name", 255))
	if d.err != nil {
		return h, d.err
	}
	// The epoch, when sent; what a later version may add after it is
	// not read.
	switch {
	case len(d.b) >= 8:
		h.Epoch = binary.LittleEndian.Uint64(d.b)
	case len(d.b) > 0:
		return h, fmt.Errorf("%w: hello with %d bytes after the directory's name", ErrBadFrame, len(d.b))
	}
	return h, nil
}

// expect reads a handshake frame of type t: the peer is not
// authenticated yet, so the frame is small and its text is cut short.
func expect(rw io.ReadWriter, t Type) (Frame, error) {
	f, err := ReadFrameMax(rw, nil, MaxHandshake)
	if err != nil {
		return f, err
	}
	if f.Type == TypeError {
		return f, fmt.Errorf("peer refused: %s", Excerpt(f.Payload))
	}
	if f.Type != t {
		return f, fmt.Errorf("%w: got %s, want %s", ErrBadFrame, f.Type, t)
	}
	return f, nil
}

// maxExcerpt bounds what Excerpt keeps of a peer's text.
const maxExcerpt = 100

// Excerpt quotes a text a peer sent, for an error or a log: cut to its
// first 100 bytes and quoted, it can neither flood a log nor forge lines
// in it.
func Excerpt(b []byte) string {
	if len(b) <= maxExcerpt {
		return strconv.Quote(string(b))
	}
	return fmt.Sprintf("%q... (%d bytes)", b[:maxExcerpt], len(b))
}

// MaxKeys is how many cluster keys a node holds at once: the current one
// and, during a rotation, the previous one.
const MaxKeys = 2

// ClientHandshake proves a key to the server and checks the server's
// proof; both sides contribute a fresh nonce. keys are the cluster keys
// this node trusts, the current one first: the server proves each of its
// own, and the client proves the first of them it shares (see
// ServerHandshake), so that a node amid a key rotation talks to one
// before or after it.
func ClientHandshake(rw io.ReadWriter, keys [][]byte, h Hello) (Welcome, error) {
	if _, err := rand.Read(h.Nonce[:]); err != nil {
		return Welcome{}, err
	}
	if err := WriteFrame(rw, &Frame{Type: TypeHello, Payload: encodeHello(&h)}); err != nil {
		return Welcome{}, err
	}
	f, err := expect(rw, TypeChallenge)
	if err != nil {
		return Welcome{}, err
	}
	if n := len(f.Payload); n < 64 || n > 32+32*MaxKeys || n%32 != 0 {
		return Welcome{}, fmt.Errorf("%w: challenge of %d bytes", ErrBadFrame, len(f.Payload))
	}
	nonceS := f.Payload[:32]
	var key []byte
	for mac := f.Payload[32:]; len(mac) > 0 && key == nil; mac = mac[32:] {
		for _, k := range keys {
			if hmac.Equal(mac[:32], proof(k, "duet-server", h.Nonce[:], nonceS)) {
				key = k
				break
			}
		}
	}
	if key == nil {
		return Welcome{}, ErrAuth
	}
	if err := WriteFrame(rw, &Frame{Type: TypeAuth, Payload: proof(key, "duet-client", h.Nonce[:], nonceS)}); err != nil {
		return Welcome{}, err
	}
	f, err = expect(rw, TypeWelcome)
	if err != nil {
		return Welcome{}, err
	}
	if len(f.Payload) != welcomeSize {
		return Welcome{}, fmt.Errorf("%w: welcome of %d bytes", ErrBadFrame, len(f.Payload))
	}
	le := binary.LittleEndian
	return Welcome{
		Session:  le.Uint64(f.Payload),
		Applied:  le.Uint64(f.Payload[8:]),
		Gen:      le.Uint64(f.Payload[16:]),
		SyncTime: int64(le.Uint64(f.Payload[24:])),
		State:    CopyState(f.Payload[32]),
		Sealed:   f.Flags&FlagSealedOK != 0,
	}, nil
}

// ServerHandshake checks the client's proof. welcome is called once the
// client is authenticated, to fill the Welcome it is sent. The challenge
// carries a proof of each of keys (the current one first); the client's
// proof may be of any of them.
func ServerHandshake(rw io.ReadWriter, keys [][]byte, welcome func(Hello) Welcome) (Hello, error) {
	if len(keys) == 0 || len(keys) > MaxKeys {
		return Hello{}, fmt.Errorf("handshake with %d keys: want 1 to %d", len(keys), MaxKeys)
	}
	f, err := expect(rw, TypeHello)
	if err != nil {
		return Hello{}, err
	}
	h, err := DecodeHello(f.Payload)
	if err != nil {
		return h, err
	}
	var nonceS [32]byte
	if _, err := rand.Read(nonceS[:]); err != nil {
		return h, err
	}
	ch := nonceS[:]
	for _, k := range keys {
		ch = append(ch, proof(k, "duet-server", h.Nonce[:], nonceS[:])...)
	}
	if err := WriteFrame(rw, &Frame{Type: TypeChallenge, Payload: ch}); err != nil {
		return h, err
	}
	f, err = expect(rw, TypeAuth)
	if err != nil {
		return h, err
	}
	ok := false
	for _, k := range keys {
		ok = ok || hmac.Equal(f.Payload, proof(k, "duet-client", h.Nonce[:], nonceS[:]))
	}
	if !ok {
		WriteFrame(rw, &Frame{Type: TypeError, Payload: []byte("authentication failed")})
		return h, ErrAuth
	}
	w := welcome(h)
	le := binary.LittleEndian
	p := le.AppendUint64(nil, w.Session)
	p = le.AppendUint64(p, w.Applied)
	p = le.AppendUint64(p, w.Gen)
	p = le.AppendUint64(p, uint64(w.SyncTime))
	p = append(p, byte(w.State))
	var flags uint16
	if w.Sealed {
		flags = FlagSealedOK
	}
	return h, WriteFrame(rw, &Frame{Type: TypeWelcome, Flags: flags, Payload: p})
}
