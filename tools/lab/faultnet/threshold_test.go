package faultnet

import (
	"math"
	"net/netip"
	"testing"
)

func TestThresholdOf(t *testing.T) {
	for _, tc := range []struct {
		fraction float64
		want     uint32
		wantErr  bool
	}{
		{fraction: 0, want: 0},
		{fraction: 0.5, want: 1 << 31},
		{fraction: 0.25, want: 1 << 30},
		{fraction: 1, want: math.MaxUint32},
		{fraction: math.Nextafter(1, 0), want: math.MaxUint32},
		{fraction: -0.1, wantErr: true},
		{fraction: 1.01, wantErr: true},
		{fraction: math.NaN(), wantErr: true},
		{fraction: math.Inf(1), wantErr: true},
	} {
		got, err := thresholdOf(tc.fraction)
		if (err != nil) != tc.wantErr || got != tc.want {
			t.Errorf("thresholdOf(%v) = %d, %v; want %d, error %v", tc.fraction, got, err, tc.want, tc.wantErr)
		}
	}
}

func TestSourceKey(t *testing.T) {
	for _, tc := range []struct {
		src     string
		want    [4]byte
		wantErr bool
	}{
		{src: "10.251.3.1", want: [4]byte{10, 251, 3, 1}},
		{src: "::ffff:10.251.3.2", want: [4]byte{10, 251, 3, 2}},
		{src: "fd00::1", wantErr: true},
	} {
		got, err := sourceKey(netip.MustParseAddr(tc.src))
		if (err != nil) != tc.wantErr || got != tc.want {
			t.Errorf("sourceKey(%s) = %v, %v; want %v, error %v", tc.src, got, err, tc.want, tc.wantErr)
		}
	}
	if _, err := sourceKey(netip.Addr{}); err == nil {
		t.Error("sourceKey of the zero Addr: no error")
	}
}
