// Package wire defines duet's replication protocol: framed messages over
// the link between the nodes (TLS, see pkg/link), a mutual HMAC handshake,
// and the operations a batch carries. Every decoder here takes bytes from
// the network and rejects malformed input with an error; none of them
// panics.
package wire

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Magic opens every frame: "DUET".
const Magic uint32 = 0x44554554

// Version is the protocol version this build speaks. 2: acks say applied,
// and durable only with FlagDurable; sync frames ask for durability.
// 3: the welcome carries the replica's generation and sync point, manifest
// requests carry resync options, entries their ctime and flags.
// 4: checksums of smaller blocks (manifest entries and wanted paths carry
// a block shift).
// 5: a resync's end is acknowledged with its own number at least (the
// replica's progress moves to it), and the source ends a resync only so.
const Version uint8 = 5

// HeaderSize is the size of a frame header.
const HeaderSize = 24

// MaxPayload bounds a frame's payload; a larger length is rejected before
// any allocation.
const MaxPayload = 64 << 20

// MaxHandshake bounds the payload of a frame read before the peer has
// proved that it knows the key (hello and auth on the server; challenge,
// welcome or a refusal on the client): a stranger cannot make a node
// allocate MaxPayload. The largest, a hello, is under 300 bytes.
const MaxHandshake = 4 << 10

// Type says what a frame carries.
type Type uint8

// Frame types.
const (
	TypeHello     Type = 1  // client → server: version, purpose, nonce
	TypeChallenge Type = 2  // server → client: nonce, server proof
	TypeAuth      Type = 3  // client → server: client proof
	TypeWelcome   Type = 4  // server → client: replica state
	TypeBatch     Type = 5  // ops, zstd compressed
	TypeAck       Type = 6  // highest batch applied (and synced, with FlagDurable)
	TypeManifestQ Type = 7  // request the peer's manifest
	TypeManifest  Type = 8  // manifest entries, zstd compressed
	TypeEnd       Type = 9  // end of a manifest stream
	TypeError     Type = 10 // the peer refuses: text
	TypeSync      Type = 11 // make every batch up to Seq durable, then ack it

	typeLast = TypeSync
)

func (t Type) String() string {
	names := map[Type]string{TypeHello: "hello", TypeChallenge: "challenge", TypeAuth: "auth",
		TypeWelcome: "welcome", TypeBatch: "batch", TypeAck: "ack", TypeManifestQ: "manifest-request",
		TypeManifest: "manifest", TypeEnd: "end", TypeError: "error", TypeSync: "sync"}
	if n, ok := names[t]; ok {
		return n
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// Frame flags.
const (
	FlagZstd    uint16 = 1 << 0 // payload is zstd compressed
	FlagDurable uint16 = 1 << 1 // on an ack: applied and synced to disk
	// FlagResyncDone on a sync frame: every batch up to Seq completes a
	// resync; the payload is a ResyncDone.
	FlagResyncDone uint16 = 1 << 2
	// FlagLazy on a sync frame: the primary's periodic sync, which the
	// replica may run in the background and acknowledge when done.
	FlagLazy uint16 = 1 << 3
	// FlagSealed: the frame travels on a link whose records are
	// authenticated (TLS), and its CRC32C covers the header only: TLS's
	// AEAD already rejects any changed byte, and a CRC over every payload
	// byte on both ends is work for nothing. Only a reader that knows its
	// link is sealed accepts it (ReadSealedFrame).
	FlagSealed uint16 = 1 << 15
	// FlagSealedOK on a welcome: the server accepts sealed frames
	// (Welcome.Sealed); servers before it leave it unset.
	FlagSealedOK uint16 = 1 << 4
	// FlagDiverged on an error frame: the replica could not apply a
	// batch because its tree is not what the batch expects (a name
	// missing, or held by something else), not for want of space or
	// a failing disk. The same batch would fail again: the primary
	// compares the trees instead. Seq is the batch.
	FlagDiverged uint16 = 1 << 5
)

// Frame is one protocol message.
type Frame struct {
	Type    Type
	Flags   uint16
	Seq     uint64
	Payload []byte
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrBadFrame wraps every framing error.
var ErrBadFrame = errors.New("bad frame")

// AppendFrame appends the encoding of f to b.
func AppendFrame(b []byte, f *Frame) []byte { return appendFrame(b, f, false) }

// AppendSealedFrame appends the encoding of f to b for a sealed link (see
// FlagSealed): the CRC32C covers the header only.
func AppendSealedFrame(b []byte, f *Frame) []byte { return appendFrame(b, f, true) }

func appendFrame(b []byte, f *Frame, sealed bool) []byte {
	start := len(b)
	b = append(b, make([]byte, HeaderSize)...)
	b = append(b, f.Payload...)
	FrameIn(b[start:], f, sealed)
	return b
}

// FrameIn makes b, whose first HeaderSize bytes are room for the header
// and whose rest is the payload, the encoding of a frame of f's type,
// flags and number, as AppendFrame (or, sealed, AppendSealedFrame)
// would make it, without copying the payload. f.Payload is not used.
func FrameIn(b []byte, f *Frame, sealed bool) []byte {
	n := len(b) - HeaderSize
	h := b[:HeaderSize]
	if sealed {
		putHeader(h, f, f.Flags|FlagSealed, n)
		binary.LittleEndian.PutUint32(h[20:], crc32.Checksum(h[:20], castagnoli))
		return b
	}
	putHeader(h, f, f.Flags, n)
	crc := crc32.Update(0, castagnoli, h[:20])
	binary.LittleEndian.PutUint32(h[20:], crc32.Update(crc, castagnoli, b[HeaderSize:]))
	return b
}

// Unsealed returns an encoded frame as a plain one: a sealed frame is
// copied with the flag cleared and the CRC32C over header and payload,
// another is returned as it is. For a frame made for a sealed link that
// goes out to a peer that does not accept sealed frames.
func Unsealed(frame []byte) []byte {
	le := binary.LittleEndian
	if len(frame) < HeaderSize || le.Uint16(frame[6:])&FlagSealed == 0 {
		return frame
	}
	c := append([]byte(nil), frame...)
	le.PutUint16(c[6:], le.Uint16(c[6:])&^FlagSealed)
	crc := crc32.Update(0, castagnoli, c[:20])
	le.PutUint32(c[20:], crc32.Update(crc, castagnoli, c[HeaderSize:]))
	return c
}

func putHeader(h []byte, f *Frame, flags uint16, n int) {
	le := binary.LittleEndian
	le.PutUint32(h[0:], Magic)
	h[4] = Version
	h[5] = byte(f.Type)
	le.PutUint16(h[6:], flags)
	le.PutUint64(h[8:], f.Seq)
	le.PutUint32(h[16:], uint32(n))
}

// WriteFrame writes f to w in one call.
func WriteFrame(w io.Writer, f *Frame) error {
	if len(f.Payload) > MaxPayload {
		return fmt.Errorf("frame payload %d bytes exceeds the %d limit", len(f.Payload), MaxPayload)
	}
	_, err := w.Write(AppendFrame(make([]byte, 0, HeaderSize+len(f.Payload)), f))
	return err
}

// ParseHeader checks a header and returns the frame it announces (without
// payload) and the payload length.
func ParseHeader(h []byte) (Frame, uint32, error) {
	return parseHeader(h, MaxPayload)
}

// parseHeader is ParseHeader with a payload limit of max bytes.
func parseHeader(h []byte, max uint32) (Frame, uint32, error) {
	if len(h) < HeaderSize {
		return Frame{}, 0, fmt.Errorf("%w: header is %d bytes, want %d", ErrBadFrame, len(h), HeaderSize)
	}
	le := binary.LittleEndian
	if m := le.Uint32(h[0:]); m != Magic {
		return Frame{}, 0, fmt.Errorf("%w: magic %#x, want %#x (not a duet peer?)", ErrBadFrame, m, Magic)
	}
	if h[4] != Version {
		return Frame{}, 0, fmt.Errorf("%w: protocol version %d, this build speaks %d", ErrBadFrame, h[4], Version)
	}
	n := le.Uint32(h[16:])
	if n > max {
		return Frame{}, 0, fmt.Errorf("%w: payload length %d exceeds the %d limit", ErrBadFrame, n, max)
	}
	f := Frame{Type: Type(h[5]), Flags: le.Uint16(h[6:]), Seq: le.Uint64(h[8:])}
	if f.Type < TypeHello || f.Type > typeLast {
		return Frame{}, 0, fmt.Errorf("%w: unknown type %d", ErrBadFrame, h[5])
	}
	return f, n, nil
}

// ReadFrame reads one frame from r, checking magic, version, length and
// CRC32C. buf is reused for the payload when large enough.
func ReadFrame(r io.Reader, buf []byte) (Frame, error) {
	return ReadFrameMax(r, buf, MaxPayload)
}

// ReadFrameMax is ReadFrame refusing, before reading or allocating it, a
// payload longer than max bytes.
func ReadFrameMax(r io.Reader, buf []byte, max uint32) (Frame, error) {
	return readFrame(r, buf, max, false)
}

// ReadSealedFrame is ReadFrame for a sealed link (TLS, see FlagSealed): it
// also accepts frames whose CRC32C covers the header only.
func ReadSealedFrame(r io.Reader, buf []byte) (Frame, error) {
	return readFrame(r, buf, MaxPayload, true)
}

func readFrame(r io.Reader, buf []byte, max uint32, sealed bool) (Frame, error) {
	var h [HeaderSize]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return Frame{}, err
	}
	f, n, err := parseHeader(h[:], max)
	if err != nil {
		return Frame{}, err
	}
	if f.Flags&FlagSealed != 0 {
		if !sealed {
			return Frame{}, fmt.Errorf("%w: a sealed frame (no payload CRC, for a TLS link) on a link without TLS", ErrBadFrame)
		}
		// The header's CRC, checked before its length is trusted.
		if crc, want := crc32.Checksum(h[:20], castagnoli), binary.LittleEndian.Uint32(h[20:]); crc != want {
			return Frame{}, fmt.Errorf("%w: header CRC32C %#x, header says %#x", ErrBadFrame, crc, want)
		}
	}
	if cap(buf) < int(n) {
		buf = make([]byte, n)
	}
	f.Payload = buf[:n]
	if _, err := io.ReadFull(r, f.Payload); err != nil {
		return Frame{}, fmt.Errorf("%w: reading %d-byte payload: %v", ErrBadFrame, n, err)
	}
	if f.Flags&FlagSealed != 0 {
		return f, nil
	}
	crc := crc32.Update(0, castagnoli, h[:20])
	crc = crc32.Update(crc, castagnoli, f.Payload)
	if want := binary.LittleEndian.Uint32(h[20:]); crc != want {
		return Frame{}, fmt.Errorf("%w: CRC32C %#x, header says %#x", ErrBadFrame, crc, want)
	}
	return f, nil
}

// DecodeFrame decodes exactly one frame from b, for fuzzing and tests.
func DecodeFrame(b []byte) (Frame, error) {
	f, n, err := ParseHeader(b)
	if err != nil {
		return Frame{}, err
	}
	if len(b) != HeaderSize+int(n) {
		return Frame{}, fmt.Errorf("%w: %d bytes after header, length says %d", ErrBadFrame, len(b)-HeaderSize, n)
	}
	f.Payload = b[HeaderSize:]
	crc := crc32.Update(0, castagnoli, b[:20])
	crc = crc32.Update(crc, castagnoli, f.Payload)
	if want := binary.LittleEndian.Uint32(b[20:]); crc != want {
		return Frame{}, fmt.Errorf("%w: CRC32C %#x, header says %#x", ErrBadFrame, crc, want)
	}
	return f, nil
}
