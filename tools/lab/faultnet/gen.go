package faultnet

//go:generate go tool bpf2go -tags linux -target amd64 faultnet ../../../bpf/faultnet.bpf.c -- -I../../../bpf/include -O2 -g
