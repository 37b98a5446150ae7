//! Render time per frame, 100 functions and 1000 sandboxes (same as
//! `sandscope top --bench-render`, without building the whole binary).

fn main() {
    for (w, h) in [(80, 24), (200, 60)] {
        let d = tui::bench_render(100, 1000, w, h, 200);
        println!(
            "render {w}x{h}, 100 functions, 1000 sandboxes: {:.3} ms/frame (mean of 200, all tabs)",
            d.as_secs_f64() * 1e3
        );
    }
}
