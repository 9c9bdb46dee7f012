// loadgen drives llmgateway.v1.GenerationService (or anything with the same
// method names) with pre-serialized requests and reports latency percentiles
// as JSON. It is compiled so that, pinned to its own core, the load
// generator is not the bottleneck of the Python servers it measures.
//
// It needs no generated Go code: a raw codec sends the request bytes as they
// are, and stream messages are classified by their first protobuf tag byte
// (StreamGenerateResponse field 3, content_block_delta, is tag 0x1a).
//
// Built in GOPATH mode against Debian's golang-google-grpc-dev, because this
// machine reaches no Go module proxy: see bench/Makefile.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"math"
	"os"
	"sort"
	"sync"
	"sync/atomic"
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

type summary struct {
	Count int     `json:"count"`
	P50   float64 `json:"p50"`
	P90   float64 `json:"p90"`
	P99   float64 `json:"p99"`
	Max   float64 `json:"max"`
	Mean  float64 `json:"mean"`
}

type result struct {
	Method      string         `json:"method"`
	Concurrency int            `json:"concurrency"`
	Connections int            `json:"connections"`
	Calls       int            `json:"calls"`
	Errors      int            `json:"errors"`
	ErrorCodes  map[string]int `json:"error_codes"`
	ElapsedS    float64        `json:"elapsed_s"`
	CallsPerS   float64        `json:"calls_per_s"`
	Messages    int64          `json:"messages"`
	LatencyMs   summary        `json:"latency_ms"`
	FirstChunk  *summary       `json:"first_chunk_ms,omitempty"`
	ChunkDelay  *summary       `json:"chunk_added_delay_ms,omitempty"`
}

func summarize(values []float64) summary {
	if len(values) == 0 {
		return summary{}
	}
	sort.Float64s(values)
	pick := func(q float64) float64 {
		i := int(math.Ceil(q*float64(len(values)))) - 1
		if i < 0 {
			i = 0
		}
		return values[i]
	}
	total := 0.0
	for _, v := range values {
		total += v
	}
	return summary{len(values), pick(0.50), pick(0.90), pick(0.99), values[len(values)-1], total / float64(len(values))}
}

func ms(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e6 }

type worker struct {
	latencies, firsts, gaps []float64
	errors                  map[string]int
	messages                int64
}

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "server address")
	method := flag.String("method", "unary", "unary (Generate) or stream (StreamGenerate)")
	service := flag.String("service", "llmgateway.v1.GenerationService", "full service name")
	requestFile := flag.String("request", "", "file holding one serialized GenerateRequest")
	concurrency := flag.Int("c", 1, "calls in flight at once")
	conns := flag.Int("conns", 1, "HTTP/2 connections (calls are spread over them)")
	total := flag.Int("n", 1000, "calls to make after warm-up (0: until -d)")
	duration := flag.Duration("d", 30*time.Second, "stop starting calls after this long")
	warmup := flag.Int("warmup", 50, "calls made and discarded before measuring")
	timeout := flag.Duration("timeout", 30*time.Second, "deadline of each call")
	interval := flag.Duration("interval", 0, "expected gap between stream chunks; reports the added delay")
	ramp := flag.Duration("ramp", 0, "start the workers evenly over this long (not all at one instant)")
	flag.Parse()

	request, err := ioutil.ReadFile(*requestFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(2)
	}
	clients := make([]*grpc.ClientConn, *conns)
	for i := range clients {
		// Each Dial is its own HTTP/2 connection; a distinct user agent makes
		// them easy to tell apart in server logs.
		dialCtx, cancelDial := context.WithTimeout(context.Background(), 10*time.Second)
		clients[i], err = grpc.DialContext(dialCtx, *addr, grpc.WithInsecure(), grpc.WithBlock(),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{}), grpc.MaxCallRecvMsgSize(64<<20)),
			grpc.WithUserAgent(fmt.Sprintf("loadgen/%d", i)))
		cancelDial()
		if err != nil {
			fmt.Fprintln(os.Stderr, "loadgen: dial:", err)
			os.Exit(2)
		}
	}
	unaryPath := "/" + *service + "/Generate"
	streamPath := "/" + *service + "/StreamGenerate"
	streamDesc := &grpc.StreamDesc{StreamName: "StreamGenerate", ServerStreams: true}

	call := func(conn *grpc.ClientConn, w *worker, record bool) {
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		defer cancel()
		start := time.Now()
		var callErr error
		var first time.Duration = -1
		if *method == "unary" {
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
			var last time.Time
			var reply []byte
			for err == nil {
				err = stream.RecvMsg(&reply)
				if err != nil {
					break
				}
				now := time.Now()
				if record {
					w.messages++
				}
				if len(reply) > 0 && reply[0] == contentDeltaTag {
					if first < 0 {
						first = now.Sub(start)
					} else if record && *interval > 0 {
						w.gaps = append(w.gaps, ms(now.Sub(last)-*interval))
					}
					last = now
				}
			}
			if err != io.EOF {
				callErr = err
			}
		}
		if !record {
			return
		}
		if callErr != nil {
			w.errors[status.Code(callErr).String()]++
			return
		}
		w.latencies = append(w.latencies, ms(time.Since(start)))
		if first >= 0 {
			w.firsts = append(w.firsts, ms(first))
		}
	}

	// Warm-up: connections, server caches and JITs (none in Python, but the
	// allocator and the SDKs' lazy imports) settle before anything counts.
	var wg sync.WaitGroup
	var next int64
	warm := &worker{errors: map[string]int{}}
	for i := 0; i < *concurrency && i < *warmup; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for atomic.AddInt64(&next, 1) <= int64(*warmup) {
				call(clients[i%len(clients)], warm, false)
			}
		}(i)
	}
	wg.Wait()

	workers := make([]*worker, *concurrency)
	next = 0
	started := time.Now()
	stopAt := started.Add(*duration)
	for i := range workers {
		workers[i] = &worker{errors: map[string]int{}}
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			if *ramp > 0 {
				time.Sleep(time.Duration(int64(*ramp) * int64(i) / int64(*concurrency)))
			}
			for time.Now().Before(stopAt) {
				if *total > 0 && atomic.AddInt64(&next, 1) > int64(*total) {
					return
				}
				call(clients[i%len(clients)], workers[i], true)
			}
		}(i)
	}
	wg.Wait()
	elapsed := time.Since(started)

	out := result{Method: *method, Concurrency: *concurrency, Connections: *conns, ErrorCodes: map[string]int{}, ElapsedS: elapsed.Seconds()}
	var latencies, firsts, gaps []float64
	for _, w := range workers {
		latencies = append(latencies, w.latencies...)
		firsts = append(firsts, w.firsts...)
		gaps = append(gaps, w.gaps...)
		out.Messages += w.messages
		for code, n := range w.errors {
			out.ErrorCodes[code] += n
			out.Errors += n
		}
	}
	out.Calls = len(latencies)
	out.CallsPerS = float64(out.Calls) / elapsed.Seconds()
	out.LatencyMs = summarize(latencies)
	if *method == "stream" {
		s := summarize(firsts)
		out.FirstChunk = &s
		if *interval > 0 {
			g := summarize(gaps)
			out.ChunkDelay = &g
		}
	}
	encoded, _ := json.Marshal(out)
	fmt.Println(string(encoded))
}
