// The gRPC protocol: raw bytes in, raw bytes out.
//
// It needs no generated Go code: a raw codec sends the request bytes as they
// are, and stream messages are classified by their first protobuf tag byte
// (StreamGenerateResponse field 3, content_block_delta, is tag 0x1a).
package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return v.([]byte), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append((*(v.(*[]byte)))[:0], data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

const contentDeltaTag = 0x1a

func grpcCaller(addr, service, method string, request []byte, conns int,
	timeout, interval time.Duration) (caller, error) {
	clients := make([]*grpc.ClientConn, conns)
	for i := range clients {
		// Each Dial is its own HTTP/2 connection; a distinct user agent makes
		// them easy to tell apart in server logs.
		dialCtx, cancelDial := context.WithTimeout(context.Background(), 10*time.Second)
		var err error
		clients[i], err = grpc.DialContext(dialCtx, addr, grpc.WithInsecure(), grpc.WithBlock(),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{}), grpc.MaxCallRecvMsgSize(64<<20)),
			grpc.WithUserAgent(fmt.Sprintf("loadgen/%d", i)))
		cancelDial()
		if err != nil {
			return nil, fmt.Errorf("dial: %w", err)
		}
	}
	unaryPath := "/" + service + "/Generate"
	streamPath := "/" + service + "/StreamGenerate"
	streamDesc := &grpc.StreamDesc{StreamName: "StreamGenerate", ServerStreams: true}

	return func(slot int, w *worker, record bool) {
		conn := clients[slot%len(clients)]
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		t := newTiming(interval, record)
		var callErr error
		var messages int64
		if method == "unary" {
			var reply []byte
			callErr = conn.Invoke(ctx, unaryPath, request, &reply)
		} else {
			stream, err := conn.NewStream(ctx, streamDesc, streamPath)
			if err == nil {
				err = stream.SendMsg(request)
			}
			if err == nil {
				err = stream.CloseSend()
			}
			var reply []byte
			for err == nil {
				err = stream.RecvMsg(&reply)
				if err != nil {
					break
				}
				messages++
				if len(reply) > 0 && reply[0] == contentDeltaTag {
					t.content()
				}
			}
			if err != io.EOF {
				callErr = err
			}
		}
		code := ""
		if callErr != nil {
			code = status.Code(callErr).String()
		}
		w.done(t, messages, code)
	}, nil
}
