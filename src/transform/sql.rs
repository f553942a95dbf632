//! The `sql` transform: a DataFusion query planned once and run over each input batch.
//!
//! The input is a table named after the input component whose contents are the current batch, so
//! every output batch maps back to exactly one input batch (and its positions). Aggregates and
//! `ORDER BY` therefore work per batch: sluice workers are stateless.

use std::fmt;
use std::sync::{Arc, Mutex};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::TableType;
use datafusion::error::DataFusionError;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PhysicalExpr, PlanProperties, SendableRecordBatchStream,
};
use datafusion::prelude::{SessionConfig, SessionContext};
use serde::Deserialize;

use super::{row_as_json, Transform};
use crate::batch::Batch;
use crate::dead_letter::{BadRecord, DeadLetter, Stage};
use crate::format::isolate_async;
use crate::observe::ComponentMetrics;
use crate::{Error, Result};

/// `[transforms.ID] type = "sql"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlTransformConfig {
    /// The one upstream component; the query reads it as a table of that name.
    pub inputs: Vec<String>,
    /// A DataFusion SQL query, e.g. `SELECT a, b * 2 AS c FROM orders WHERE a > 0`.
    pub query: String,
}

/// The batch the planned query reads on its next execution.
type Slot = Arc<Mutex<Option<RecordBatch>>>;

/// A planned SQL query.
pub struct SqlTransform {
    component: String,
    ctx: SessionContext,
    plan: Arc<dyn ExecutionPlan>,
    slot: Slot,
}

impl SqlTransform {
    /// Plans `query` against a table `input` of `schema`.
    ///
    /// # Errors
    /// The planner's message: unknown columns or functions, syntax errors, type errors.
    pub async fn new(component: &str, input: &str, schema: SchemaRef, query: &str) -> Result<Self, String> {
        let mut config = SessionConfig::new().with_target_partitions(1).with_information_schema(false);
        // The plan is executed again for every batch: dynamic filters would carry one batch's
        // state (a TopK threshold, a join's build side) into the next.
        config.options_mut().optimizer.enable_dynamic_filter_pushdown = false;
        let ctx = SessionContext::new_with_config(config);
        let slot: Slot = Arc::default();
        ctx.register_table(input, Arc::new(BatchTable { schema, slot: slot.clone() })).map_err(|e| e.to_string())?;
        let df = ctx.sql(query).await.map_err(clean)?;
        let plan = df.create_physical_plan().await.map_err(clean)?;
        Ok(SqlTransform { component: component.to_string(), ctx, plan, slot })
    }

    async fn run(&self, data: RecordBatch) -> Result<Vec<RecordBatch>, DataFusionError> {
        // Operators that keep state between executions (a join's build side) start afresh.
        let plan = datafusion::physical_plan::execution_plan::reset_plan_states(self.plan.clone())?;
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(data);
        let out = datafusion::physical_plan::collect(plan, self.ctx.task_ctx()).await;
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
        out
    }
}

fn clean(e: DataFusionError) -> String {
    let s = e.strip_backtrace();
    s.strip_prefix("Error during planning: ").map(str::to_string).unwrap_or(s)
}

#[async_trait]
impl Transform for SqlTransform {
    fn output_schema(&self) -> SchemaRef {
        self.plan.schema()
    }

    async fn process(
        &mut self,
        batch: Batch,
        dead_letter: &DeadLetter,
        metrics: &ComponentMetrics,
    ) -> Result<Vec<Batch>> {
        let data = batch.data.clone();
        let outputs = match self.run(data.clone()).await {
            Ok(out) => out,
            Err(whole) => {
                // Find the rows that fail on their own; run the rest in as few pieces as possible.
                let this = &*self;
                let isolated = isolate_async(data.num_rows(), |r| {
                    let slice = data.slice(r.start, r.len());
                    async move { this.run(slice).await.map_err(clean) }
                })
                .await;
                if isolated.bad.is_empty() {
                    return Err(Error::datafusion(&self.component, whole));
                }
                let bad = isolated
                    .bad
                    .into_iter()
                    .map(|(i, error)| BadRecord {
                        position: batch.row_position(i),
                        stage: Stage::Transform,
                        error,
                        raw: row_as_json(&data, i),
                        key: None,
                    })
                    .collect();
                dead_letter.send(metrics, &batch.shard, &batch.ack, bad).await?;
                // Run the query once more over all the good rows together, so aggregates and
                // LIMIT see the whole batch less the bad rows, not one piece at a time.
                let pieces: Vec<RecordBatch> = isolated.good.iter().map(|r| data.slice(r.start, r.len())).collect();
                let good = arrow::compute::concat_batches(&data.schema(), &pieces)
                    .map_err(|e| Error::arrow(&self.component, e))?;
                self.run(good).await.map_err(|e| Error::datafusion(&self.component, e))?
            }
        };
        Ok(outputs.into_iter().filter(|b| b.num_rows() > 0).map(|b| batch.with_data(b, None)).collect())
    }
}

/// A table whose contents are the batch in the slot at execution time.
#[derive(Debug)]
struct BatchTable {
    schema: SchemaRef,
    slot: Slot,
}

#[async_trait]
impl TableProvider for BatchTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn table_type(&self) -> TableType {
        TableType::Temporary
    }
    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let schema = match projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => self.schema.clone(),
        };
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        Ok(Arc::new(BatchExec {
            schema,
            projection: projection.cloned(),
            slot: self.slot.clone(),
            properties: Arc::new(properties),
        }))
    }
}

/// Scans the slot's batch.
#[derive(Debug)]
struct BatchExec {
    schema: SchemaRef,
    projection: Option<Vec<usize>>,
    slot: Slot,
    properties: Arc<PlanProperties>,
}

impl DisplayAs for BatchExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BatchExec")
    }
}

impl ExecutionPlan for BatchExec {
    fn name(&self) -> &str {
        "BatchExec"
    }
    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }
    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> datafusion::error::Result<TreeNodeRecursion>,
    ) -> datafusion::error::Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }
    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }
    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }
    fn execute(
        &self,
        _partition: usize,
        _context: Arc<TaskContext>,
    ) -> datafusion::error::Result<SendableRecordBatchStream> {
        let batch = self.slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let batches = match batch {
            Some(b) => vec![match &self.projection {
                Some(p) => b.project(p)?,
                None => b,
            }],
            None => vec![],
        };
        Ok(Box::pin(MemoryStream::try_new(batches, self.schema.clone(), None)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{Ack, ShardInfo, ShardKind};
    use crate::source::generator::{generate, shape_schema, Shape};
    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;

    fn batch(data: RecordBatch) -> Batch {
        let shard =
            Arc::new(ShardInfo { source: "orders".into(), id: "gen-0".into(), kind: ShardKind::Sequence, epoch: None });
        let n = data.num_rows() as u64;
        Batch {
            data,
            shard: shard.clone(),
            first: 0,
            last: n - 1,
            row_positions: Some((0..n).collect()),
            ack: Ack::detached(shard),
            memory: None,
        }
    }

    #[tokio::test]
    async fn planned_once_runs_per_batch() {
        let schema = shape_schema(Shape::Orders);
        let mut t = SqlTransform::new(
            "clean",
            "orders",
            schema.clone(),
            "SELECT order_id, amount * 2 AS double FROM orders WHERE order_id % 2 = 0",
        )
        .await
        .unwrap();
        let m = ComponentMetrics::new("clean");
        for start in [0u64, 100] {
            let out = t
                .process(batch(generate(Shape::Orders, &schema, 1, start, start + 100)), &DeadLetter::none(), &m)
                .await
                .unwrap();
            let ids: Vec<i64> =
                out.iter().flat_map(|b| b.data.column(0).as_primitive::<Int64Type>().values().to_vec()).collect();
            assert_eq!(ids, (start as i64 + 1..=start as i64 + 100).filter(|v| v % 2 == 0).collect::<Vec<_>>());
        }
        assert_eq!(t.output_schema().field(1).name(), "double");
    }

    #[tokio::test]
    async fn state_does_not_leak_from_one_batch_into_the_next() {
        let schema = shape_schema(Shape::Orders);
        let queries = [
            "SELECT order_id FROM orders ORDER BY order_id DESC LIMIT 3",
            "SELECT o.order_id FROM orders o JOIN (SELECT max(order_id) AS m FROM orders) x ON o.order_id = x.m",
            "SELECT order_id FROM orders WHERE order_id >= (SELECT max(order_id) FROM orders)",
        ];
        let m = ComponentMetrics::new("t");
        for q in queries {
            let mut t = SqlTransform::new("t", "orders", schema.clone(), q).await.unwrap();
            for start in [0u64, 100, 50] {
                let out = t
                    .process(batch(generate(Shape::Orders, &schema, 1, start, start + 10)), &DeadLetter::none(), &m)
                    .await
                    .unwrap();
                let ids: Vec<i64> =
                    out.iter().flat_map(|b| b.data.column(0).as_primitive::<Int64Type>().values().to_vec()).collect();
                assert_eq!(ids.first(), Some(&(start as i64 + 10)), "{q} on batch from {start}: {ids:?}");
            }
        }
    }

    #[tokio::test]
    async fn aggregates_after_isolation_see_all_good_rows_at_once() {
        let schema = shape_schema(Shape::Orders);
        let q = "SELECT count(*) AS n, sum(CAST(CASE WHEN order_id % 10 = 3 THEN 'x' ELSE '1' END AS INT)) AS s FROM orders";
        let mut t = SqlTransform::new("t", "orders", schema.clone(), q).await.unwrap();
        let (tx, _rx) = tokio::sync::mpsc::channel(8);
        let out = t
            .process(
                batch(generate(Shape::Orders, &schema, 1, 0, 40)),
                &DeadLetter::new(Some(tx)),
                &ComponentMetrics::new("t"),
            )
            .await
            .unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].data.num_rows(), 1, "one aggregate row, not one per piece");
        assert_eq!(out[0].data.column(0).as_primitive::<Int64Type>().value(0), 36);
    }

    #[tokio::test]
    async fn planning_errors_name_the_column() {
        let err = SqlTransform::new("clean", "orders", shape_schema(Shape::Orders), "SELECT nope FROM orders")
            .await
            .err()
            .unwrap();
        assert!(err.contains("nope"), "{err}");
    }

    #[tokio::test]
    async fn failing_rows_are_isolated_and_the_rest_flows() {
        let schema = shape_schema(Shape::Orders);
        let mut t = SqlTransform::new(
            "t",
            "orders",
            schema.clone(),
            "SELECT order_id, CAST(CASE WHEN order_id % 10 = 3 THEN 'x' ELSE '1' END AS INT) AS one FROM orders",
        )
        .await
        .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let m = ComponentMetrics::new("t");
        let out =
            t.process(batch(generate(Shape::Orders, &schema, 1, 0, 40)), &DeadLetter::new(Some(tx)), &m).await.unwrap();
        let rows: usize = out.iter().map(|b| b.data.num_rows()).sum();
        assert_eq!(rows, 36);
        let dl = rx.recv().await.unwrap();
        assert_eq!(dl.data.num_rows(), 4);
        let err = dl.data.column_by_name("error").unwrap().as_string::<i32>().value(0).to_string();
        assert!(err.contains("Cannot cast") || err.contains("cast"), "{err}");
    }
}
