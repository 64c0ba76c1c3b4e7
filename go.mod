module github.com/duet-ha/duet

go 1.26.8

tool github.com/cilium/ebpf/cmd/bpf2go

require (
	github.com/cilium/ebpf v0.22.0
	github.com/klauspost/compress v1.18.0
	golang.org/x/sys v0.50.0
)
