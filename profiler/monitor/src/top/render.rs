//! How `vmm top` draws its screen: the table rows of VMs, vCPUs and tasks, the header, the
//! sparklines of the selected VM and the footer (the drawing half of [`super::App`]).

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Sparkline, Table};
use ratatui::Frame;

use super::{App, RowRef, SortKey};
use crate::model::History;
use crate::plot::short_number;

const SPARKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// A text sparkline of the last `width` values (blank for zero; scaled to their maximum).
pub fn sparkline_text(h: &History, width: usize) -> String {
    let values: Vec<f64> = h.values().collect();
    let tail = &values[values.len().saturating_sub(width)..];
    let max = tail.iter().copied().fold(0.0f64, f64::max);
    tail.iter()
        .map(|&v| {
            if v <= 0.0 || max <= 0.0 {
                ' '
            } else {
                // `v / max` is in (0, 1]: the index is within `SPARKS`.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let i = ((v / max) * (SPARKS.len() - 1) as f64).round() as usize;
                SPARKS[i.min(SPARKS.len() - 1)]
            }
        })
        .collect()
}

fn rate(v: f64) -> String {
    short_number(if v.is_finite() { v } else { 0.0 })
}

fn pct(v: f64) -> String {
    format!("{:.1}", if v.is_finite() { v * 100.0 } else { 0.0 })
}

impl App {
    fn table_row(&self, r: &RowRef, spark_width: usize) -> Option<Row<'static>> {
        let dash = || "-".to_string();
        let cells: Vec<String>;
        let mut style = Style::default();
        match *r {
            RowRef::Vm(id) => {
                let vm = self.fleet.model.vms.get(&id)?;
                let info = self.fleet.info.get(&id);
                let name = info.map_or_else(|| format!("vm-{id}"), |i| i.name.clone());
                let what = info.map_or(String::new(), |i| {
                    format!(
                        " ({}{} vCPU)",
                        if i.guest.is_empty() {
                            String::new()
                        } else {
                            format!("{}, ", i.guest)
                        },
                        i.vcpus
                    )
                });
                let mut lost = if vm.lost_guest + vm.lost_host > 0 {
                    format!(" lost {}/{}", vm.lost_guest, vm.lost_host)
                } else {
                    String::new()
                };
                if vm.paused {
                    lost.insert_str(0, " [paused]");
                }
                if self
                    .fleet
                    .vm(id)
                    .is_some_and(|v| v.header_changes() != (0, 0))
                {
                    lost.push_str(" [header rewritten]");
                }
                if self
                    .fleet
                    .info
                    .get(&id)
                    .is_some_and(|i| i.guest_error.is_some())
                {
                    lost.push_str(" [guest region invalid: host figures only]");
                }
                if vm.dropped > 0 {
                    lost.push_str(&format!(" dropped {}", vm.dropped));
                }
                if let Some(m) = &vm.mem {
                    lost.push_str(&memory_text(m));
                }
                cells = vec![
                    "VM".into(),
                    id.to_string(),
                    format!("{name}{what}{lost}"),
                    rate(vm.rates.min_flt),
                    rate(vm.rates.maj_flt),
                    rate(vm.rates.ept),
                    rate(vm.rates.host_flt),
                    pct(vm.rates.guest_cpu),
                    pct(vm.rates.vcpu_util),
                    sparkline_text(self.sort.vm_history(vm), spark_width),
                ];
                style = style.add_modifier(Modifier::BOLD).fg(Color::Cyan);
            }
            RowRef::Vcpu(id, index) => {
                let vm = self.fleet.model.vms.get(&id)?;
                let v = vm.vcpus.get(&index)?;
                let running = vm
                    .tasks
                    .get(&v.last_task)
                    .map_or_else(|| "(no task)".to_string(), |t| t.label());
                cells = vec![
                    "vcpu".into(),
                    index.to_string(),
                    format!("→ {running}"),
                    dash(),
                    dash(),
                    rate(v.rates.ept),
                    rate(v.rates.host_flt),
                    dash(),
                    pct(v.rates.util),
                    sparkline_text(self.sort.vcpu_history(v), spark_width),
                ];
                style = style.fg(Color::Yellow);
            }
            RowRef::Task(id, key) => {
                let vm = self.fleet.model.vms.get(&id)?;
                let t = vm.tasks.get(&key)?;
                let idtext = if key.is_unattributed() {
                    "-".to_string()
                } else {
                    format!("{}/{}", key.task_id, key.pid)
                };
                let mut name = if t.exited {
                    format!("{} (exited)", t.label())
                } else {
                    t.label()
                };
                // How its host figures were charged: exact, sampled or mixed.
                if t.host.samples > 0 {
                    name.push_str(&format!(" [{}]", t.host.attribution()));
                }
                if t.host.cow_breaks > 0 {
                    name.push_str(&format!(" CoW {}", t.host.cow_breaks));
                }
                cells = vec![
                    "task".into(),
                    idtext,
                    name,
                    rate(t.rates.min_flt),
                    rate(t.rates.maj_flt),
                    rate(t.rates.ept),
                    rate(t.rates.host_flt),
                    pct(t.rates.cpu),
                    pct(t.rates.vcpu),
                    sparkline_text(self.sort.task_history(t), spark_width),
                ];
            }
        }
        Some(Row::new(cells.into_iter().map(Cell::from).collect::<Vec<_>>()).style(style))
    }

    /// Draws the whole screen.
    pub fn render(&mut self, f: &mut Frame<'_>) {
        let area = f.area();
        let footer_lines = self.footer_lines();
        let [head, body, sparks, foot] = Layout::vertical([
            Constraint::Length(2),
            Constraint::Min(4),
            Constraint::Length(4),
            Constraint::Length(u16::try_from(footer_lines.len() + 1).unwrap_or(u16::MAX)),
        ])
        .areas(area);
        self.render_header(f, head);
        let rows = self.rows();
        if rows.is_empty() {
            let msg = format!(
                "no VM running in {} (waiting; VMs are picked up as they start)",
                self.fleet.run_dir().display()
            );
            f.render_widget(Paragraph::new(msg).block(Block::bordered()), body);
        } else {
            self.render_table(f, body, &rows);
        }
        self.render_sparks(f, sparks, &rows);
        let mut lines = footer_lines;
        lines.push(Line::from(Span::styled(
            match &self.editing {
                Some(t) => format!("filter: {t}▏  (Enter apply, Esc clear)"),
                None => "q quit  s sort  r reverse  / filter  ↑↓ PgUp PgDn move".into(),
            },
            Style::default().add_modifier(Modifier::REVERSED),
        )));
        f.render_widget(Paragraph::new(lines), foot);
    }

    fn render_header(&self, f: &mut Frame<'_>, area: Rect) {
        let n = self.fleet.model.vms.len();
        let line1 = format!(
            "mirrorball top — {} — {} VM{}{} — every {} ms",
            self.fleet.run_dir().display(),
            n,
            if n == 1 { "" } else { "s" },
            if self.fleet.stale.is_empty() {
                String::new()
            } else {
                format!(", {} stale", self.fleet.stale.len())
            },
            self.interval.as_millis()
        );
        let line2 = format!(
            "sort: {} {}{}   rates per second over the last interval; CPU% = guest CPU \
             (tasks), VCPU% = vCPU-thread CPU on the host",
            self.sort.title(),
            if self.descending && self.sort != SortKey::Id {
                "▼"
            } else {
                "▲"
            },
            if self.filter.is_empty() {
                String::new()
            } else {
                format!("   filter: \"{}\"", self.filter)
            }
        );
        f.render_widget(
            Paragraph::new(vec![
                Line::from(Span::styled(
                    line1,
                    Style::default().add_modifier(Modifier::BOLD),
                )),
                Line::from(line2),
            ]),
            area,
        );
    }

    fn render_table(&mut self, f: &mut Frame<'_>, area: Rect, rows: &[RowRef]) {
        let widths = [
            Constraint::Length(4),
            Constraint::Length(11),
            Constraint::Min(16),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Length(6),
            Constraint::Length(6),
            Constraint::Length(24),
        ];
        let header_titles = [
            "KIND",
            "ID",
            "NAME",
            SortKey::MinFlt.title(),
            SortKey::MajFlt.title(),
            SortKey::Ept.title(),
            SortKey::HostFlt.title(),
            SortKey::Cpu.title(),
            "VCPU%",
            "HISTORY",
        ];
        let sorted_col = match self.sort {
            SortKey::Id => 1,
            SortKey::MinFlt => 3,
            SortKey::MajFlt => 4,
            SortKey::Ept => 5,
            SortKey::HostFlt => 6,
            SortKey::Cpu => 7,
        };
        let header = Row::new(
            header_titles
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let style = if i == sorted_col {
                        Style::default().add_modifier(Modifier::BOLD | Modifier::UNDERLINED)
                    } else {
                        Style::default().add_modifier(Modifier::BOLD)
                    };
                    Cell::from(*t).style(style)
                })
                .collect::<Vec<_>>(),
        );
        let body: Vec<Row> = rows.iter().filter_map(|r| self.table_row(r, 24)).collect();
        let n = body.len();
        if let Some(sel) = self.table.selected() {
            if sel >= n {
                self.table.select(Some(n.saturating_sub(1)));
            }
        }
        let table = Table::new(body, widths)
            .header(header)
            .block(Block::bordered())
            .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED));
        f.render_stateful_widget(table, area, &mut self.table);
    }

    fn render_sparks(&self, f: &mut Frame<'_>, area: Rect, rows: &[RowRef]) {
        let Some(id) = self.selected_vm(rows) else {
            return;
        };
        let Some(vm) = self.fleet.model.vms.get(&id) else {
            return;
        };
        let halves = Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
            .split(area);
        // Float-to-integer `as` saturates; negatives are clamped to 0 first.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let to_u64 = |h: &History| -> Vec<u64> { h.values().map(|v| v.max(0.0) as u64).collect() };
        let width = halves[0].width.saturating_sub(2) as usize;
        let tail = |v: Vec<u64>| -> Vec<u64> { v[v.len().saturating_sub(width)..].to_vec() };
        let guest = tail(to_u64(&vm.history.guest_flt));
        let ept = tail(to_u64(&vm.history.ept));
        f.render_widget(
            Sparkline::default()
                .block(Block::bordered().title(format!(
                    "VM {id} guest faults/s (now {})",
                    rate(vm.rates.min_flt + vm.rates.maj_flt)
                )))
                .style(Style::default().fg(Color::Green))
                .data(&guest),
            halves[0],
        );
        f.render_widget(
            Sparkline::default()
                .block(
                    Block::bordered()
                        .title(format!("VM {id} EPT faults/s (now {})", rate(vm.rates.ept))),
                )
                .style(Style::default().fg(Color::Magenta))
                .data(&ept),
            halves[1],
        );
    }

    fn footer_lines(&self) -> Vec<Line<'static>> {
        let mut lines = Vec::new();
        let dim = Style::default().fg(Color::DarkGray);
        if let Some(e) = &self.fleet.scan_error {
            lines.push(Line::from(Span::styled(format!("error: {e}"), dim)));
        }
        for (id, why, _) in self.fleet.ended.iter().take(3) {
            lines.push(Line::from(Span::styled(
                format!("VM {id} ended: {why}"),
                dim,
            )));
        }
        for (id, e) in self.fleet.errors.iter().take(3) {
            lines.push(Line::from(Span::styled(
                format!("VM {id} unreadable: {e}"),
                Style::default().fg(Color::Red),
            )));
        }
        if !self.fleet.stale.is_empty() {
            let list: Vec<String> = self
                .fleet
                .stale
                .iter()
                .take(4)
                .map(|s| format!("vm-{} ({})", s.id, s.reason))
                .collect();
            let more = self.fleet.stale.len().saturating_sub(4);
            lines.push(Line::from(Span::styled(
                format!(
                    "stale, ignored: {}{}",
                    list.join(", "),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                ),
                dim,
            )));
        }
        lines
    }
}

/// A VM's memory against its template, for its row: pages shared with the template and of its
/// own, and copy-on-write breaks since it started.
fn memory_text(m: &mirrorball_profiler_abi::MemSharingFigures) -> String {
    let merged = if m.merged_pages > 0 {
        format!(", KSM {}", m.merged_pages)
    } else {
        String::new()
    };
    format!(
        " [{} pages: shared {}, private {}, CoW {}{merged}]",
        if m.cloned { "clone" } else { "own" },
        m.shared_pages,
        m.private_pages,
        m.cow_breaks
    )
}
