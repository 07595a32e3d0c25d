//! The live consumers on synthetic VMs: the fleet, `top`'s screen and keys (on a test
//! backend), and the Prometheus exposition, once and served on loopback.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{temp_dir, Synthetic};
use mirrorball_monitor::fleet::Fleet;
use mirrorball_monitor::prometheus;
use mirrorball_monitor::top::{Action, App, RowRef, SortKey};
use mirrorball_monitor::ModelConfig;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;

fn key(c: KeyCode) -> KeyEvent {
    KeyEvent::new(c, KeyModifiers::NONE)
}

fn screen(app: &mut App, w: u16, h: u16) -> String {
    let mut term = Terminal::new(TestBackend::new(w, h)).unwrap();
    term.draw(|f| app.render(f)).unwrap();
    let buf = term.backend().buffer().clone();
    let mut text = String::new();
    for y in 0..h {
        for x in 0..w {
            text.push_str(buf[(x, y)].symbol());
        }
        text.push('\n');
    }
    text
}

#[test]
fn fleet_follows_vms_and_top_renders_sorts_and_filters() {
    let dir = temp_dir("top");
    let mut app = App::new(&dir, Duration::from_millis(500));
    app.fleet.tick();
    let empty = screen(&mut app, 150, 30);
    assert!(empty.contains("no VM running"), "{empty}");

    let mut a = Synthetic::new(&dir, 0, 2, 3);
    a.step();
    app.fleet.tick();
    for _ in 0..10 {
        a.step();
    }
    app.fleet.tick();
    let id = a.vm.id();
    let vm = &app.fleet.model.vms[&id];
    assert_eq!(vm.tasks.len(), 3);
    // 10 periods of 50 ms: task i makes (i + 1) * 100 minor faults per period = 2000 (i + 1)/s.
    let t2 = vm.tasks.values().find(|t| t.label() == "work-2").unwrap();
    assert!((t2.rates.min_flt - 6000.0).abs() < 1e-6, "{:?}", t2.rates);
    assert!((t2.rates.cpu - 0.5).abs() < 1e-9);
    let v1 = &vm.vcpus[&1];
    assert!((v1.rates.ept - 201.0 * 20.0).abs() < 1e-6, "{:?}", v1.rates);
    assert!((v1.rates.util - 0.75).abs() < 1e-9);

    let text = screen(&mut app, 150, 30);
    for needle in [
        "synthetic-0",
        "work-0",
        "work-1",
        "work-2",
        "vcpu",
        "EPT/s",
        "6.0k",
        "q quit",
    ] {
        assert!(text.contains(needle), "{needle:?} not on screen:\n{text}");
    }
    // Sorted by EPT/s (descending) by default: vCPU 1 (201/period) before vCPU 0 (101).
    let rows = app.rows();
    assert_eq!(rows[0], RowRef::Vm(id));
    assert_eq!(rows[1], RowRef::Vcpu(id, 1));

    assert_eq!(app.sort, SortKey::Ept);
    assert_eq!(app.on_key(key(KeyCode::Char('s'))), Action::Redraw);
    assert_eq!(app.sort, SortKey::HostFlt);
    app.on_key(key(KeyCode::Char('s')));
    app.on_key(key(KeyCode::Char('s')));
    assert_eq!(app.sort, SortKey::Id);
    app.on_key(key(KeyCode::Char('s')));
    assert_eq!(app.sort, SortKey::MinFlt);
    // Tasks by minor faults, largest first: work-2, work-1, work-0.
    let tasks: Vec<String> = app
        .rows()
        .iter()
        .filter_map(|r| match r {
            RowRef::Task(_, k) => Some(app.fleet.model.vms[&id].tasks[k].label()),
            _ => None,
        })
        .collect();
    assert_eq!(tasks, ["work-2", "work-1", "work-0"]);

    // Filter.
    app.on_key(key(KeyCode::Char('/')));
    for c in "WORK-1".chars() {
        app.on_key(key(KeyCode::Char(c)));
    }
    let typing = screen(&mut app, 150, 30);
    assert!(typing.contains("filter: WORK-1"), "{typing}");
    app.on_key(key(KeyCode::Enter));
    assert_eq!(app.filter, "WORK-1");
    let n_tasks = app
        .rows()
        .iter()
        .filter(|r| matches!(r, RowRef::Task(..)))
        .count();
    assert_eq!(n_tasks, 1);
    let filtered = screen(&mut app, 150, 30);
    assert!(
        filtered.contains("work-1") && !filtered.contains("work-2"),
        "{filtered}"
    );
    app.on_key(key(KeyCode::Char('/')));
    app.on_key(key(KeyCode::Esc));
    assert!(app.filter.is_empty());

    // A second VM appears; the first one ends.
    let mut b = Synthetic::new(&dir, 1, 1, 1);
    b.step();
    app.fleet.tick();
    assert_eq!(app.fleet.model.vms.len(), 2);
    a.vm.unpublish();
    app.fleet.tick();
    assert_eq!(app.fleet.model.vms.len(), 1);
    assert!(app
        .fleet
        .ended
        .iter()
        .any(|(e, why, _)| *e == id && why.contains("removed")));
    let text = screen(&mut app, 150, 30);
    assert!(
        text.contains("synthetic-1") && !text.contains("synthetic-0"),
        "{text}"
    );
    assert!(text.contains(&format!("VM {id} ended")), "{text}");

    // Tiny terminals do not panic.
    for (w, h) in [(1, 1), (20, 5), (80, 8)] {
        let _ = screen(&mut app, w, h);
    }
    assert_eq!(app.on_key(key(KeyCode::Char('q'))), Action::Quit);
    assert_eq!(
        app.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
        Action::Quit
    );
}

#[test]
fn prometheus_exposition_once_and_served() {
    let dir = temp_dir("prom");
    let mut a = Synthetic::new(&dir, 0, 2, 2);
    for _ in 0..5 {
        a.step();
    }
    let mut fleet = Fleet::new(&dir, ModelConfig::default());
    fleet.refresh();
    fleet.poll();
    let text = prometheus::render(&fleet);
    let id = a.vm.id();
    let expect = [
        format!("mirrorball_vm_info{{vm=\"{id}\",name=\"synthetic-0\",guest=\"workload\",vcpus=\"2\"}} 1"),
        format!("mirrorball_guest_task_minor_faults_total{{vm=\"{id}\",task_id=\"1\",pid=\"201\",comm=\"work-1\"}} 1000"),
        format!("mirrorball_guest_task_major_faults_total{{vm=\"{id}\",task_id=\"1\",pid=\"201\",comm=\"work-1\"}} 5"),
        format!("mirrorball_task_kvm_pf_taken_total{{vm=\"{id}\",task_id=\"0\",pid=\"200\",comm=\"work-0\"}} 505"),
        format!("mirrorball_vcpu_kvm_pf_taken_total{{vm=\"{id}\",vcpu=\"1\"}} 1005"),
        format!("mirrorball_vcpu_cpu_seconds_total{{vm=\"{id}\",vcpu=\"0\",mode=\"user\"}} 0.125"),
        format!("mirrorball_vm_records_lost_total{{vm=\"{id}\",ring=\"guest\"}} 0"),
        "# TYPE mirrorball_vcpu_kvm_exits_total counter".to_string(),
    ];
    for line in &expect {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
    // Every sample line is NAME{labels} VALUE with a number.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let (_, v) = l.rsplit_once(' ').expect("value");
        assert!(v.parse::<f64>().is_ok(), "{l}");
    }

    let listener = prometheus::bind_loopback("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let server = s.spawn(|| {
            let mut fleet = Fleet::new(&dir, ModelConfig::default());
            prometheus::serve_on(&mut fleet, listener, Duration::from_millis(100), &stop)
        });
        let get = |path: &str| -> String {
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut body = String::new();
            c.read_to_string(&mut body).unwrap();
            body
        };
        let page = get("/metrics");
        assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
        assert!(page.contains("text/plain; version=0.0.4"));
        assert!(page.contains(&expect[1]), "{page}");
        assert!(get("/nope").starts_with("HTTP/1.1 404"));
        // A client that connects and says nothing does not block the server for long.
        let idle = TcpStream::connect(addr).unwrap();
        assert!(get("/").starts_with("HTTP/1.1 200"));
        drop(idle);
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap().expect("server");
    });
}

/// Issue 8 §5: ten clients that connect and say nothing do not delay a scrape (the old server
/// gave each 2 s in turn), and a flood of connections is refused without growing the server.
/// Copy-on-write breaks charged to a task (memory records) show in `top`'s task row and in the
/// exposition, and do not count as host samples.
#[test]
fn cow_breaks_per_task_in_top_and_prometheus() {
    let dir = temp_dir("cow");
    let mut a = Synthetic::new(&dir, 0, 2, 2);
    a.step();
    a.cow(0, 7);
    a.step();
    a.cow(0, 5);
    a.cow(1, 3);
    let mut app = App::new(&dir, Duration::from_millis(500));
    app.fleet.tick();
    app.fleet.tick();
    let id = a.vm.id();
    let vm = &app.fleet.model.vms[&id];
    let task = |name: &str| vm.tasks.values().find(|t| t.label() == name).unwrap();
    assert_eq!(task("work-0").host.cow_breaks, 12);
    assert_eq!(task("work-1").host.cow_breaks, 3);
    assert_eq!(
        task("work-0").host.samples,
        2,
        "memory records are not samples"
    );
    let text = screen(&mut app, 150, 30);
    assert!(
        text.contains("work-0 [exact] CoW 12") || text.contains("work-0 [sampled] CoW 12"),
        "{text}"
    );
    let mut fleet = Fleet::new(&dir, ModelConfig::default());
    fleet.refresh();
    fleet.poll();
    let exposition = prometheus::render(&fleet);
    let line = format!(
        "mirrorball_task_cow_breaks_total{{vm=\"{id}\",task_id=\"{}\",pid=\"200\",comm=\"work-0\"}} 12",
        a.tasks[0].0
    );
    assert!(
        exposition.lines().any(|l| l == line),
        "missing {line:?} in:\n{exposition}"
    );
}

#[test]
fn idle_connections_do_not_delay_a_scrape() {
    let dir = temp_dir("prom-idle");
    let listener = prometheus::bind_loopback("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let server = s.spawn(|| {
            let mut fleet = Fleet::new(&dir, ModelConfig::default());
            prometheus::serve_on(&mut fleet, listener, Duration::from_millis(100), &stop)
        });
        let idle: Vec<TcpStream> = (0..10).map(|_| TcpStream::connect(addr).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(100));
        let start = std::time::Instant::now();
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(c, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut page = String::new();
        c.read_to_string(&mut page).unwrap();
        assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
        // Served while all ten idle clients still held their connections (each has 2 s).
        assert!(
            start.elapsed() < prometheus::http::REQUEST_DEADLINE,
            "{:?}",
            start.elapsed()
        );
        drop(idle);
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap().expect("server");
    });
}
