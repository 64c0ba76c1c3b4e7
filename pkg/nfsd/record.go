package nfsd

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
)

// kind is the type of an index log record.
type kind uint8

const (
	// kindHeader opens every index file: magic, generation, handle key.
	kindHeader kind = 1
	// kindEnd closes the snapshot at the start of a file. A file without
	// it was being written when the server stopped and is not used.
	kindEnd kind = 2
	// kindSet places an ID at a name (a new object, or an existing one
	// given its first ID).
	kindSet kind = 3
	// kindDel forgets an ID and everything under it.
	kindDel kind = 4
	// kindMove is a rename, written before the rename is done: it carries
	// the old place and the ID it replaces, so that a server that finds
	// the rename not done can put both back (see index.settleMove, index.forget).
	kindMove kind = 5
)

// magic starts every header record.
const magic = "duet-nfs"

// keyLen is the length of the handle key kept in the header.
const keyLen = 32

// frameLen is the size of a record's frame: payload length and CRC32C.
const frameLen = 8

// maxPayload bounds a record: the longest (a move) carries two names of at
// most 255 bytes. A larger length is a torn or damaged frame.
const maxPayload = 1024

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// record is one entry of the index log.
type record struct {
	kind     kind
	id       uint64
	parent   uint64 // set, move: the new place
	name     string
	from     uint64 // move: the old place
	fromName string
	replaced uint64 // move: the ID the rename replaces, 0 if none
	gen      uint64 // header
	key      []byte // header
	count    uint64 // end: set records in the snapshot
}

// encode appends r's frame to b.
func (r record) encode(b []byte) []byte {
	p := []byte{byte(r.kind)}
	switch r.kind {
	case kindHeader:
		p = append(p, magic...)
		p = binary.LittleEndian.AppendUint64(p, r.gen)
		p = append(p, r.key...)
	case kindEnd:
		p = binary.LittleEndian.AppendUint64(p, r.count)
	case kindSet:
		p = binary.LittleEndian.AppendUint64(p, r.id)
		p = binary.LittleEndian.AppendUint64(p, r.parent)
		p = appendName(p, r.name)
	case kindDel:
		p = binary.LittleEndian.AppendUint64(p, r.id)
	case kindMove:
		p = binary.LittleEndian.AppendUint64(p, r.id)
		p = binary.LittleEndian.AppendUint64(p, r.from)
		p = appendName(p, r.fromName)
		p = binary.LittleEndian.AppendUint64(p, r.parent)
		p = appendName(p, r.name)
		p = binary.LittleEndian.AppendUint64(p, r.replaced)
	}
	b = binary.LittleEndian.AppendUint32(b, uint32(len(p)))
	b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(p, castagnoli))
	return append(b, p...)
}

func appendName(p []byte, name string) []byte {
	p = binary.LittleEndian.AppendUint16(p, uint16(len(name)))
	return append(p, name...)
}

// decodeAll returns the records of b up to the first frame that is short,
// oversized, fails its checksum or does not parse, and the length of that
// valid prefix. A crash in the middle of an append leaves such a frame
// (or zeros, on a peer that got the file's new size before its bytes);
// since every append is made durable before anything depends on it,
// nothing after the first bad frame was ever acknowledged.
func decodeAll(b []byte) ([]record, int) {
	var out []record
	off := 0
	for len(b)-off >= frameLen {
		n := int(binary.LittleEndian.Uint32(b[off:]))
		sum := binary.LittleEndian.Uint32(b[off+4:])
		if n == 0 || n > maxPayload || len(b)-off-frameLen < n {
			break
		}
		p := b[off+frameLen : off+frameLen+n]
		if crc32.Checksum(p, castagnoli) != sum {
			break
		}
		r, err := decode(p)
		if err != nil {
			break
		}
		out = append(out, r)
		off += frameLen + n
	}
	return out, off
}

// decode parses one payload.
func decode(p []byte) (record, error) {
	d := decoder{b: p[1:]}
	r := record{kind: kind(p[0])}
	switch r.kind {
	case kindHeader:
		if string(d.bytes(len(magic))) != magic {
			return r, fmt.Errorf("header without the %q magic", magic)
		}
		r.gen = d.u64()
		r.key = d.bytes(keyLen)
	case kindEnd:
		r.count = d.u64()
	case kindSet:
		r.id, r.parent, r.name = d.u64(), d.u64(), d.name()
	case kindDel:
		r.id = d.u64()
	case kindMove:
		r.id, r.from, r.fromName = d.u64(), d.u64(), d.name()
		r.parent, r.name, r.replaced = d.u64(), d.name(), d.u64()
	default:
		return r, fmt.Errorf("unknown record kind %d", p[0])
	}
	if d.bad || len(d.b) != 0 {
		return r, fmt.Errorf("record of kind %d has the wrong length", r.kind)
	}
	if (r.kind == kindSet || r.kind == kindMove) && (r.name == "" || r.kind == kindMove && r.fromName == "") {
		return r, fmt.Errorf("record of kind %d with an empty name", r.kind)
	}
	return r, nil
}

// decoder reads fields from a payload, remembering a short read.
type decoder struct {
	b   []byte
	bad bool
}

func (d *decoder) bytes(n int) []byte {
	if len(d.b) < n {
		d.bad, d.b = true, nil
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) u64() uint64 {
	v := d.bytes(8)
	if v == nil {
		return 0
	}
	return binary.LittleEndian.Uint64(v)
}

func (d *decoder) name() string {
	l := d.bytes(2)
	if l == nil {
		return ""
	}
	return string(d.bytes(int(binary.LittleEndian.Uint16(l))))
}
