package capture

//go:generate go tool bpf2go -tags linux -target amd64 -type record Capture ../../bpf/capture.bpf.c -- -I../../bpf/include -O2 -g
