package nfsd

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
)

// handleVersion starts every handle, so that a later layout can be told
// apart.
const handleVersion = 1

// handleLen is version, file ID and MAC: 16 bytes. It must be a multiple
// of 4: go-nfs v0.0.4 reads some handles (ACCESS, SETATTR) without the XDR
// padding, so the arguments after a handle of another length are read
// shifted (ACCESS then grants nothing, SETATTR sets garbage).
const handleLen = 1 + 8 + macLen

// macLen is the length of the truncated HMAC-SHA256 that ends a handle:
// 56 bits, so a forged handle is accepted with a chance of 2^-56.
const macLen = 7

// handleKey makes and checks handles. The key is kept in the index, so
// it moves with the export to the peer: handles depend on nothing but
// replicated data (no inode number, no device, no server instance).
type handleKey []byte

// handle encodes id. The MAC makes a forged handle, a handle of another
// export (another key) or a damaged one STALE instead of some other file.
func (k handleKey) handle(id uint64) []byte {
	h := make([]byte, 0, handleLen)
	h = append(h, handleVersion)
	h = binary.BigEndian.AppendUint64(h, id)
	return append(h, k.mac(h)...)
}

// id decodes and checks a handle.
func (k handleKey) id(h []byte) (uint64, error) {
	if len(h) != handleLen || h[0] != handleVersion {
		return 0, fmt.Errorf("handle of %d bytes, version %d: not one of this server's: %w", len(h), first(h), errStale)
	}
	if !hmac.Equal(h[1+8:], k.mac(h[:1+8])) {
		return 0, fmt.Errorf("handle %x: not made with this export's key: %w", h, errStale)
	}
	return binary.BigEndian.Uint64(h[1:]), nil
}

func (k handleKey) mac(b []byte) []byte {
	m := hmac.New(sha256.New, k)
	m.Write(b)
	return m.Sum(nil)[:macLen]
}

func first(b []byte) int {
	if len(b) == 0 {
		return -1
	}
	return int(b[0])
}
